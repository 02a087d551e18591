"""The SPL engine of the SLS emulator (tests/spl.py): parsing, typing, null handling, commands."""
import re

import pytest
from hypothesis import given, settings, strategies as st

from tests.spl import Log, SplError, SplRuntimeError, parse_statement

LOG = {"__time__": "100", "__time_ns_part__": "7", "__topic__": "waf_access_log",
       "__source__": "log_service", "__tag__:__receive_time__": "101",
       "method": "GET", "status": "404", "path": "/a_b%c", "empty": "", "quote": "it's"}


def run(statement, fields=None):
    """The processed log as a field dict (values as stored: text), or None if it was dropped."""
    result = parse_statement(statement).run(Log.from_fields(LOG if fields is None else fields))
    return None if result is None else {name: str(value) for name, value in result.fields().items()}


def value_of(expression, fields=None):
    """What an expression evaluates to, as stored by extend: 'true', 'false', text, or None (null)."""
    return run(f"* | extend result = {expression}", fields).get("result")


def test_star_alone_passes_every_log_unchanged():
    for statement in ("*", "* ;", "  *  -- everything\n", "/* all */ *"):
        assert run(statement) == LOG


@pytest.mark.parametrize("expression, expected", [
    ("method = 'GET'", "true"), ("method = 'get'", "false"),
    ("method <> 'GET'", "false"), ("method != 'POST'", "true"),
    ("method < 'H'", "true"), ("method > 'H'", "false"),
    ("method <= 'GET'", "true"), ("method >= 'GEU'", "false"),
    ("status > '1000'", "true"),  # varchars compare as text: '4' > '1'
    ("cast(status as bigint) > 1000", "false"),
    ("cast(status as bigint) >= 404", "true"), ("cast(status as bigint) < 404", "false"),
    ("cast(status as double) <= 403.5", "false"), ("cast(status as integer) = 404.0", "true"),
    ("__time__ > 99", "true"),  # time fields are bigint
    ("method like 'G%'", "true"), ("method like 'g%'", "false"), ("method like 'G_T'", "true"),
    ("method like 'G_'", "false"), ("method not like '%E%'", "false"),
    ("path like '%!_b!%%' escape '!'", "true"), ("path like '%x!_b%' escape '!'", "false"),
    ("quote like '%''s'", "true"),
    ("method in ('POST', 'GET')", "true"), ("method not in ('POST', 'PUT')", "true"),
    ("method in ('POST', null)", None), ("missing in ('a')", None),
    ("cast(status as bigint) between 400 and 499", "true"),
    ("cast(status as bigint) not between 400 and 499", "false"),
    ("missing is null", "true"), ("missing is not null", "false"),
    ("empty is null", "false"), ("empty = ''", "true"),  # an empty value is not null
    ("missing = 'x'", None), ("missing <> 'x'", None), ("not (missing = 'x')", None),
    ("missing = 'x' or method = 'GET'", "true"), ("missing = 'x' or method = 'POST'", None),
    ("missing = 'x' and method = 'POST'", "false"), ("missing = 'x' and method = 'GET'", None),
    ("method = 'GET' or method = 'POST' and status = '1'", "true"),  # and binds tighter than or
    ("(method = 'GET' or method = 'POST') and status = '1'", "false"),
    ("not method = 'POST' and status = '404'", "true"),  # not binds tighter than and
    ("NOT method = 'GET' OR Status = '404'", None),  # keywords ignore case, field names do not
    ("cast(status as bigint) + 1", "405"), ("cast(status as bigint) * 2 - 8", "800"),
    ("7 / 2", "3"), ("-7 / 2", "-3"), ("7 % 3", "1"), ("-7 % 3", "-1"), ("7 / 2.0", "3.5"),
    ("cast('2.5' as double) * 2", "5.0"), ("cast(cast('2.5' as double) as bigint)", "3"),
    ("cast(-2.5 as bigint)", "-3"), ("cast('true' as boolean)", "true"),
    ("cast(__time__ as varchar)", "100"), ("cast(status as varchar)", "404"),
    ("null", None), ("true", "true"), ("'text'", "text"), ("\"__tag__:__receive_time__\"", "101"),
])
def test_expressions(expression, expected):
    assert value_of(expression) == expected


def test_where_keeps_a_log_only_when_the_condition_is_true():
    assert run("* | where method = 'GET'") == LOG
    assert run("* | where method = 'POST'") is None
    assert run("* | where missing <> 'pass'") is None  # null: a log without the field is dropped
    assert run("* | where missing is null or missing <> 'pass'") == LOG
    assert run("* | where __topic__ = 'waf_access_log' and \"__tag__:__receive_time__\" = '101'") == LOG
    assert run("* | where method = 'GET' | where status = '200'") is None


@pytest.mark.parametrize("statement, message", [
    ("* | where status > 200", "line 1:18: Cannot apply operator: varchar > bigint"),
    ("* | where status = 404", "varchar = bigint"),
    ("* | where status in ('200', 404)", "varchar IN bigint"),
    ("* | where status between 200 and 299", "varchar BETWEEN bigint"),
    ("* | where cast(status as bigint) = '404'", "bigint = varchar"),
    ("* | where __time__ = '100'", "bigint = varchar"),
    ("* | where status like 4", "LIKE works on varchar"),
    ("* | where status + 1 > 2", "Cannot apply operator: varchar + bigint"),
    ("* | where -status = 'x'", "Cannot negate varchar"),
    ("* | where status", "where needs a boolean condition, got varchar"),
    ("* | where not status", "NOT needs boolean operands"),
    ("* | where status = '1' and 1", "AND needs boolean operands"),
    ("* | extend __time__ = '5'", "__time__ must be assigned an integer"),
    ("* | extend a = '1', a = '2'", "assigns the same field twice"),
    ("* | extend n = cast(status as bigint) | project-away n | where n > 1", "varchar > bigint"),
    ("", "mismatched input <EOF> expecting '*'"),
    ("status = 1", "line 1:1: mismatched input 'status' expecting '*'"),
    ("* | where", "mismatched input <EOF>"),
    ("* | where a = 'x' and", "mismatched input <EOF>"),
    ("* | where a = 'x' | ", "expecting an SPL instruction"),
    ("* | where a = 'unterminated", "unexpected character \"'\""),
    ("* | where a == 'x'", "mismatched input '='"),
    ("* | where a = 'x' = 'y'", "mismatched input '='"),
    ("* | where a in 'x'", "expecting '('"),
    ("* | where cast(a as text) = 'x'", "expecting a type"),
    ("* | where a like 'x' escape 'ab'", "escape must be a single character"),
    ("* | where a like 'x!a' escape '!'", "must escape '%', '_' or itself"),
    ("* | where lower(a) = 'x'", "function lower() is not supported by the SLS emulator"),
    ("* | where and = 'x'", "expecting a field name"),
    ("* | parse-json content", "instruction 'parse-json' is not supported by the SLS emulator"),
    ("* | project -regex a", "unknown option -regex"),
    ("* | project-rename a=__time__", "cannot be renamed"),
    ("* | project x=a, x=b", "two fields are renamed to the same name"),
    ("* | project-rename a=b, c=b", "a field is renamed twice"),
    (".let x = *", "unexpected character '.'"),
    ("$src | where a = 'x'", "unexpected character '$'"),
    ("* | where a = 'x' extra", "expecting '|', ';' or <EOF>"),
    ("*\n| where\n  status > 1", "line 3:10: Cannot apply operator"),
    ("* | where cast(status as bigint) > 99999999999999999999", "out of the bigint range"),
])
def test_invalid_statements_are_rejected_before_any_data(statement, message):
    with pytest.raises(SplError, match=re.escape(message)):
        parse_statement(statement)


@pytest.mark.parametrize("expression", [
    "cast(path as bigint)", "cast('1.5' as bigint)", "cast(' 1' as bigint)", "cast('1e3x' as double)",
    "cast('maybe' as boolean)", "cast('3000000000' as integer)", "cast('9223372036854775807' as bigint) + 1",
    "1 / 0", "1 % 0",
])
def test_a_value_that_cannot_be_computed_fails_the_log(expression):
    statement = parse_statement(f"* | extend result = {expression}")  # the statement is valid
    with pytest.raises(SplRuntimeError):
        statement.run(Log.from_fields(LOG))


def test_a_failure_in_a_where_fails_the_log_and_a_null_does_not():
    statement = parse_statement("* | where cast(status as bigint) >= 400")
    with pytest.raises(SplRuntimeError, match="Cannot cast '-' to BIGINT"):
        statement.run(Log.from_fields(dict(LOG, status="-")))
    assert statement.run(Log.from_fields({"__time__": "1"})) is None  # cast(null) is null


def test_project_keeps_the_listed_fields_in_the_listed_order_and_the_time_fields():
    result = run("* | project status, \"__tag__:__receive_time__\", missing, method")
    assert result == {"__time__": "100", "__time_ns_part__": "7", "__tag__:__receive_time__": "101",
                      "status": "404", "method": "GET"}
    assert list(Log.from_fields(result).contents) == [("status", "404"), ("method", "GET")]
    processed = parse_statement("* | project status").run(Log.from_fields(LOG))
    assert (processed.topic, processed.source, processed.tags) == (None, None, [])


def test_project_renames_after_retaining_and_matches_wildcards():
    assert run("* | project code=status, method") == {
        "__time__": "100", "__time_ns_part__": "7", "method": "GET", "code": "404"}
    assert run("* | project -wildcard \"__*\", \"m*d\"") == {
        name: value for name, value in LOG.items() if name.startswith("__") or name == "method"}


def test_project_away_removes_fields_but_never_the_time_fields():
    assert run("* | project-away status, __topic__, __time__, missing") == {
        name: value for name, value in LOG.items() if name not in ("status", "__topic__")}
    assert run("* | project-away -wildcard \"__tag__:*\", \"*at*\"") == {
        name: value for name, value in LOG.items()
        if name not in ("__tag__:__receive_time__", "status", "path")}


def test_project_rename_renames_in_place():
    result = parse_statement("* | project-rename code=status, m=method, x=missing").run(Log.from_fields(LOG))
    assert result.contents == [("m", "GET"), ("code", "404"), ("path", "/a_b%c"), ("empty", ""),
                               ("quote", "it's")]
    # A renamed field replaces a field of the target name; a swap works.
    assert run("* | project-rename method=status")["method"] == "404"
    swapped = run("* | project-rename method=status, status=method")
    assert (swapped["method"], swapped["status"]) == ("404", "GET")


def test_extend_sets_fields_from_the_log_as_it_was_before_the_extend():
    result = parse_statement("* | extend method = 'POST', new = method, gone = missing, empty = null"
                             ).run(Log.from_fields(LOG))
    assert result.contents == [("method", "POST"), ("status", "404"), ("path", "/a_b%c"),
                               ("quote", "it's"), ("new", "GET")]
    later = run("* | extend n = cast(status as bigint) * 2 | where n > 800 | extend m = n + 1")
    assert (later["n"], later["m"]) == ("808", "809")  # n stays a bigint through the pipeline
    renamed = run("* | extend n = cast(status as bigint) | project-rename k=n | where k = 404")
    assert renamed["k"] == "404"


def test_extend_sets_the_time_topic_and_tags():
    result = parse_statement("* | extend __time__ = __time__ + 10, __topic__ = 'x', \"__tag__:k\" = 'v'"
                             ).run(Log.from_fields(LOG))
    assert (result.time, result.topic, result.tags) == (110, "x", [("__receive_time__", "101"), ("k", "v")])
    with pytest.raises(SplRuntimeError, match="__time__ must be an integer from 0"):
        parse_statement("* | extend __time__ = -1").run(Log.from_fields(LOG))


def test_quoting_comments_and_case():
    fields = dict(LOG, **{"a\"b": "1", "Method": "other"})
    statement = ('/* SIEM */ * -- all\n| WHERE "a""b" = \'1\' AND Method = \'other\' '
                 '| Project-Away "__tag__:__receive_time__";')
    assert run(statement, fields) == {k: v for k, v in fields.items() if k != "__tag__:__receive_time__"}


# ---------------------------------------------------------------------------------------------
# Property: random conditions agree with SQL's three-valued logic, computed here independently.

def _compare(field, test):
    return lambda log: None if log.get(field) is None else test(log[field])


ATOMS = [  # (SPL text, what it is for a log: True, False or None for null)
    ("a = 'x'", _compare("a", lambda v: v == "x")),
    ("a <> 'y'", _compare("a", lambda v: v != "y")),
    ("a like 'x%'", _compare("a", lambda v: v.startswith("x"))),
    ("a in ('x', '')", _compare("a", lambda v: v in ("x", ""))),
    ("b < 'm'", _compare("b", lambda v: v < "m")),
    ("cast(n as bigint) > 3", _compare("n", lambda v: int(v) > 3)),
    ("a is null", lambda log: "a" not in log),
    ("b is not null", lambda log: "b" in log),
    ("true", lambda log: True), ("false", lambda log: False), ("null", lambda log: None),
]


def _kleene_and(x, y):
    return False if False in (x, y) else None if None in (x, y) else True


def _kleene_or(x, y):
    return True if True in (x, y) else None if None in (x, y) else False


conditions = st.recursive(
    st.sampled_from(ATOMS),
    lambda inner: st.one_of(
        inner.map(lambda c: (f"not ({c[0]})", lambda log: None if c[1](log) is None else not c[1](log))),
        st.tuples(inner, inner).map(lambda p: (f"({p[0][0]}) and ({p[1][0]})",
                                               lambda log: _kleene_and(p[0][1](log), p[1][1](log)))),
        st.tuples(inner, inner).map(lambda p: (f"({p[0][0]}) or ({p[1][0]})",
                                               lambda log: _kleene_or(p[0][1](log), p[1][1](log))))),
    max_leaves=6)
logs = st.fixed_dictionaries({"__time__": st.just("1")}, optional={
    "a": st.sampled_from(["x", "xy", "y", ""]), "b": st.sampled_from(["a", "m", "z"]),
    "n": st.sampled_from(["1", "3", "10"])})


@settings(max_examples=200, deadline=None)
@given(conditions, logs)
def test_random_conditions_follow_three_valued_logic(condition, fields):
    text, truth = condition
    expected = truth(fields)
    assert value_of(text, fields) == {True: "true", False: "false", None: None}[expected]
    assert (run(f"* | where {text}", fields) is not None) == (expected is True)
