"""A small SPL (SLS Processing Language) engine: the subset that rule-based consumption needs.

SLS applies an SPL statement to each log when a consumer pulls with `query=<spl>` or with a
consume processor (`processor=<name>`); the SLS emulator (sls_emulator.py) uses this module for
that. `parse_statement(text)` checks a statement once (syntax and types) and returns a `Statement`
whose `run(log)` gives the processed log, or None when the log is filtered out.

The subset
----------
    * [| command]... [;]              the data source is always `*` (the whole logstore)
    where <condition>
    extend name = <expr> [, name = <expr>]...
    project [-wildcard] field | output=field [, ...]
    project-away [-wildcard] field [, ...]
    project-rename output=field [, ...]
Expressions: string literals 'it''s', numbers (42 is bigint, 4.2 and 4e2 are double), true, false,
null, fields (bare `[A-Za-z_][A-Za-z0-9_]*`, or double-quoted: "__tag__:__receive_time__",
"a""b"), parentheses, `=`, `<>`, `!=`, `<`, `>`, `<=`, `>=`, `[not] like 'pattern' [escape 'c']`
(`%` any run, `_` one character, case-sensitive), `[not] in (...)`, `[not] between a and b`,
`is [not] null`, `not`, `and`, `or` (precedence not > and > or), `+ - * / %` on numbers, unary
minus, `cast(x as bigint|integer|double|varchar|boolean)`. Keywords are case-insensitive, field
names are case-sensitive. Comments: `-- to the end of the line` and `/* ... */`.

How SLS exposes a log to SPL
----------------------------
Every content field is VARCHAR. `__time__` and `__time_ns_part__` are BIGINT; they survive
project / project-away and cannot be renamed; only extend may set them (to an integer).
`__topic__`, `__source__` and `__tag__:<key>` are VARCHAR fields like the others: `project a, b`
drops them, so the result has no topic, source or tags. A field a log does not have is null.

Typing (SQL rules, as SLS's SQL and SPL share them)
---------------------------------------------------
Comparing VARCHAR with a number (`status > 200`) is a type error of the statement, found before
any data is read: write `cast(status as bigint) > 200`. VARCHARs compare by code point, numbers
numerically. Null follows SQL's three-valued logic: a comparison with null is null, `null and
false` is false, `null or true` is true, `not null` is null, and `where` keeps a log only when its
condition is true. So `where final_action <> 'pass'` also drops every log WITHOUT a final_action.
`cast` of a value it cannot convert (`cast('abc' as bigint)`), integer overflow, division by zero:
the log fails (`SplRuntimeError`); the emulator counts it as failed and drops it.

Where SLS documents nothing, this module chooses (and the emulator docstring lists these):
`project` outputs the retained fields in the order listed, then the renamed ones; `extend`
evaluates all its expressions on the log as it was before the extend; a renamed field replaces a
field of the same name and keeps the renamed field's position; extend to null removes the field;
doubles are written as Python's repr; a log with two contents of the same key keeps the last one.
Anything outside the subset (other commands, functions, `.let`, `$dataset`) is an `SplError`.

Sources: "Basic SPL syntax" https://help.aliyun.com/zh/sls/basic-spl-syntax (symbols, quoting,
real-time consumption reads `*`, case-sensitive fields); "Field operation instructions"
https://www.alibabacloud.com/help/en/sls/field-operation-instructions (project, project-away,
project-rename, -wildcard); "General reference" https://help.aliyun.com/zh/sls/spl-general-reference
(time fields are BIGINT and kept by project*); "Comparison operators"
https://www.alibabacloud.com/help/en/sls/comparison-operators and "Logical operators"
https://www.alibabacloud.com/help/en/sls/user-guide/logical-operators (operators in SPL, quoting,
precedence, true/false/null); "Type conversion functions"
https://help.aliyun.com/en/sls/data-type-conversion-functions (cast fails on bad input);
"Data filtering and cleaning" https://www.alibabacloud.com/help/en/sls/user-guide/data-filtering-and-cleaning
(`where __topic__ != 'app'`: topic, source and tags are fields).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

VARCHAR, BIGINT, INTEGER, DOUBLE, BOOLEAN, UNKNOWN = (
    "varchar", "bigint", "integer", "double", "boolean", "unknown")  # UNKNOWN: the null literal
NUMERIC = (BIGINT, INTEGER, DOUBLE)
CAST_TYPES = (BIGINT, INTEGER, DOUBLE, VARCHAR, BOOLEAN)
INTEGER_RANGES = {BIGINT: (-2 ** 63, 2 ** 63 - 1), INTEGER: (-2 ** 31, 2 ** 31 - 1)}
TIME_FIELDS = ("__time__", "__time_ns_part__")
TIME_RANGES = {"__time__": (0, 2 ** 32 - 1), "__time_ns_part__": (0, 999_999_999)}
TOPIC, SOURCE, TAG_PREFIX = "__topic__", "__source__", "__tag__:"
KEYWORDS = {"and", "or", "not", "like", "escape", "in", "between", "is", "null", "true", "false",
            "cast", "as"}


class SplError(ValueError):
    """The statement is invalid (syntax or types): SLS rejects it before reading any data."""


class SplRuntimeError(Exception):
    """One log cannot be processed, e.g. `cast('abc' as bigint)`."""


# ---------------------------------------------------------------------------------------------
# Logs.

@dataclass
class Log:
    """A log as SLS stores it: time, ordered (key, value) contents, and its LogGroup's topic,
    source and tags (None: the LogGroup has no such field)."""
    time: int
    contents: list = field(default_factory=list)
    topic: Optional[str] = None
    source: Optional[str] = None
    tags: list = field(default_factory=list)
    time_ns: Optional[int] = None

    def fields(self) -> dict:
        """The log as SPL sees it: field name -> value (time fields int, the rest str)."""
        row = {"__time__": self.time}
        if self.time_ns is not None:
            row["__time_ns_part__"] = self.time_ns
        if self.topic is not None:
            row[TOPIC] = self.topic
        if self.source is not None:
            row[SOURCE] = self.source
        row.update((TAG_PREFIX + key, value) for key, value in self.tags)
        row.update(self.contents)
        return row

    @classmethod
    def from_fields(cls, row: dict) -> "Log":
        """The inverse of fields(): values of any SPL type; null (None) means absent."""
        log = cls(time=int(row["__time__"]))
        for name, value in row.items():
            if value is None or name == "__time__":
                continue
            if name == "__time_ns_part__":
                log.time_ns = int(value)
            elif name == TOPIC:
                log.topic = text_of(value)
            elif name == SOURCE:
                log.source = text_of(value)
            elif name.startswith(TAG_PREFIX):
                log.tags.append((name[len(TAG_PREFIX):], text_of(value)))
            else:
                log.contents.append((name, text_of(value)))
        return log


def text_of(value) -> str:
    """A value as stored in a log (every stored value is text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# Tokens.

@dataclass
class Token:
    kind: str       # "string", "name" (bare), "quoted" (double-quoted name), "number", "op", "end"
    text: str       # the value: a string's or name's content, a number's digits, an operator
    start: int
    end: int

    def is_word(self, *words) -> bool:
        return self.kind == "name" and self.text.lower() in words

    def is_op(self, *ops) -> bool:
        return self.kind == "op" and self.text in ops


_TOKEN_PATTERNS = [  # order matters: comments before "-" and "/", two-character ops before one
    ("space", r"\s+|--[^\n]*|/\*.*?\*/"),
    ("string", r"'(?:[^']|'')*'"),
    ("quoted", r'"(?:[^"]|"")*"'),
    ("number", r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"),
    ("name", r"[A-Za-z_][A-Za-z0-9_]*"),
    ("op", r"<>|!=|<=|>=|[=<>(),|;*+\-/%]"),
]
_TOKEN_RE = re.compile("|".join(f"(?P<{kind}>{pattern})" for kind, pattern in _TOKEN_PATTERNS),
                       re.DOTALL)


def tokenize(text: str) -> list:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise SplError(_where(text, pos) + f"unexpected character {text[pos]!r}")
        kind, value = match.lastgroup, match.group()
        if kind in ("string", "quoted"):
            value = value[1:-1].replace(value[0] * 2, value[0])
        if kind != "space":
            tokens.append(Token(kind, value, pos, match.end()))
        pos = match.end()
    tokens.append(Token("end", "", len(text), len(text)))
    return tokens


def _where(text: str, pos: int) -> str:
    """`line L:C: `, the way SLS prefixes statement errors."""
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)  # rfind gives -1 on the first line: 1-based either way
    return f"line {line}:{column}: "


# ---------------------------------------------------------------------------------------------
# Expressions: each node knows its type (checked while parsing) and evaluates on a row.

class Expr:
    """An expression node: `type` is its SPL type, checked while parsing, and `evaluate(row)`
    gives its value for one log (None for null)."""
    type: str


@dataclass
class Literal(Expr):
    value: object
    type: str

    def evaluate(self, row):
        return self.value


@dataclass
class FieldRef(Expr):
    name: str
    type: str

    def evaluate(self, row):
        return row.get(self.name)


def _sql_not(value):
    return None if value is None else not value


def _sql_and(left, right):
    if left is False or right is False:
        return False
    return None if left is None or right is None else True


def _sql_or(left, right):
    if left is True or right is True:
        return True
    return None if left is None or right is None else False


@dataclass
class Not(Expr):
    operand: Expr
    type: str = BOOLEAN

    def evaluate(self, row):
        return _sql_not(self.operand.evaluate(row))


@dataclass
class Logical(Expr):
    combine: Callable
    left: Expr
    right: Expr
    type: str = BOOLEAN

    def evaluate(self, row):
        return self.combine(self.left.evaluate(row), self.right.evaluate(row))


_COMPARISONS = {"=": lambda a, b: a == b, "<>": lambda a, b: a != b, "!=": lambda a, b: a != b,
                "<": lambda a, b: a < b, ">": lambda a, b: a > b,
                "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}


@dataclass
class Comparison(Expr):
    compare: Callable
    left: Expr
    right: Expr
    type: str = BOOLEAN

    def evaluate(self, row):
        left, right = self.left.evaluate(row), self.right.evaluate(row)
        return None if left is None or right is None else self.compare(left, right)


@dataclass
class In(Expr):
    value: Expr
    candidates: list
    type: str = BOOLEAN

    def evaluate(self, row):
        value = self.value.evaluate(row)
        if value is None:
            return None
        found = False  # SQL: `x in (a, null)` is true if x = a, else null
        for candidate in self.candidates:
            found = _sql_or(found, _equal(value, candidate.evaluate(row)))
        return found


def _equal(left, right):
    return None if left is None or right is None else left == right


@dataclass
class Between(Expr):
    value: Expr
    low: Expr
    high: Expr
    type: str = BOOLEAN

    def evaluate(self, row):
        value, low, high = (e.evaluate(row) for e in (self.value, self.low, self.high))
        above = None if value is None or low is None else value >= low
        below = None if value is None or high is None else value <= high
        return _sql_and(above, below)


@dataclass
class IsNull(Expr):
    operand: Expr
    type: str = BOOLEAN

    def evaluate(self, row):
        return self.operand.evaluate(row) is None


@dataclass
class Like(Expr):
    value: Expr
    pattern: Expr
    escape: Optional[Expr]
    type: str = BOOLEAN

    def __post_init__(self):
        # A literal pattern (the usual case) is translated once, not for every log.
        self._fixed = None
        if isinstance(self.pattern, Literal) and (self.escape is None or isinstance(self.escape, Literal)):
            self._fixed = self._regex(self.pattern.value, self.escape and self.escape.value)

    @staticmethod
    def _regex(pattern, escape):
        """The regex of a LIKE pattern; None for a null pattern (the result is null)."""
        if escape is not None and len(escape) != 1:
            raise SplRuntimeError(f"escape must be a single character, got {escape!r}")
        if pattern is None:
            return None
        parts, chars = [], iter(pattern)
        for char in chars:
            if char == escape:
                escaped = next(chars, None)
                if escaped not in ("%", "_", escape):
                    raise SplRuntimeError(f"{escape!r} must escape '%', '_' or itself in {pattern!r}")
                parts.append(re.escape(escaped))
            else:
                parts.append(".*" if char == "%" else "." if char == "_" else re.escape(char))
        return re.compile("".join(parts), re.DOTALL)

    def evaluate(self, row):
        value = self.value.evaluate(row)
        regex = self._fixed or self._regex(self.pattern.evaluate(row),
                                           self.escape and self.escape.evaluate(row))
        return None if value is None or regex is None else regex.fullmatch(value) is not None


def _check_integer(value: int, type_name: str) -> int:
    low, high = INTEGER_RANGES[type_name]
    if not low <= value <= high:
        raise SplRuntimeError(f"{type_name} overflow: {value}")
    return value


def _divide(a, b):
    if isinstance(a, float) or isinstance(b, float):  # IEEE: x / 0.0 is infinite or NaN
        if b:
            return a / b
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1, b)
    if b == 0:
        raise SplRuntimeError("Division by zero")
    quotient = abs(a) // abs(b)  # SQL truncates toward zero
    return quotient if (a < 0) == (b < 0) else -quotient


def _remainder(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return math.fmod(a, b) if b else math.nan
    if b == 0:
        raise SplRuntimeError("Division by zero")
    return a - b * _divide(a, b)


_ARITHMETIC = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
               "/": _divide, "%": _remainder}


@dataclass
class Arithmetic(Expr):
    operate: Callable
    left: Expr
    right: Expr
    type: str

    def evaluate(self, row):
        left, right = self.left.evaluate(row), self.right.evaluate(row)
        if left is None or right is None:
            return None
        result = self.operate(left, right)
        return result if self.type == DOUBLE else _check_integer(result, self.type)


@dataclass
class Negate(Expr):
    operand: Expr
    type: str

    def evaluate(self, row):
        value = self.operand.evaluate(row)
        if value is None:
            return None
        return -value if self.type == DOUBLE else _check_integer(-value, self.type)


_INTEGER_TEXT = re.compile(r"[+-]?\d+")
_DOUBLE_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Infinity|NaN")
_BOOLEAN_TEXT = {"true": True, "t": True, "1": True, "false": False, "f": False, "0": False}


@dataclass
class Cast(Expr):
    operand: Expr
    type: str

    def evaluate(self, row):
        value = self.operand.evaluate(row)
        if value is None:
            return None
        try:
            return self._convert(value)
        except (ValueError, KeyError, OverflowError):
            raise SplRuntimeError(f"Cannot cast {text_of(value)!r} to {self.type.upper()}") from None

    def _convert(self, value):
        if self.type == VARCHAR:
            return text_of(value)
        if self.type == BOOLEAN:
            return _BOOLEAN_TEXT[value.lower()] if isinstance(value, str) else value != 0
        if self.type == DOUBLE:
            if isinstance(value, str) and not _DOUBLE_TEXT.fullmatch(value):
                raise ValueError(value)
            return float(value)
        if isinstance(value, str) and not _INTEGER_TEXT.fullmatch(value):
            raise ValueError(value)
        if isinstance(value, float):  # SQL rounds half away from zero
            value = int(math.copysign(math.floor(abs(value) + 0.5), value))
        return _check_integer(int(value), self.type)


# ---------------------------------------------------------------------------------------------
# Commands: each turns a row (field name -> value) into a row, or None to drop the log.

def _name_matcher(pattern: str, wildcard: bool) -> Callable:
    if not wildcard:
        return lambda name: name == pattern
    regex = re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)
    return lambda name: regex.fullmatch(name) is not None


@dataclass
class Where:
    condition: Expr

    def apply(self, row):
        return row if self.condition.evaluate(row) is True else None


@dataclass
class Extend:
    assignments: list  # [(field name, Expr)]

    def apply(self, row):
        values = [(name, expr.evaluate(row)) for name, expr in self.assignments]
        for name, value in values:
            if name in TIME_FIELDS:
                low, high = TIME_RANGES[name]
                if value is None or not low <= value <= high:
                    raise SplRuntimeError(f"{name} must be an integer from {low} to {high}, got {value}")
            if value is None:
                row.pop(name, None)
            else:
                row[name] = value
        return row


@dataclass
class Project:
    retained: list  # [matcher]
    renames: list   # [(output, field)]

    def apply(self, row):
        result = {name: row[name] for name in TIME_FIELDS if name in row}
        for matches in self.retained:
            result.update((name, value) for name, value in row.items() if matches(name))
        result.update((output, row[source]) for output, source in self.renames if source in row)
        return result


@dataclass
class ProjectAway:
    removed: list  # [matcher]

    def apply(self, row):
        return {name: value for name, value in row.items()
                if name in TIME_FIELDS or not any(matches(name) for matches in self.removed)}


@dataclass
class ProjectRename:
    renames: list  # [(output, field)]

    def apply(self, row):
        renamed = {source: output for output, source in self.renames if source in row}
        replaced = set(renamed.values())
        result = {}
        for name, value in row.items():
            if name in renamed:
                result[renamed[name]] = value
            elif name not in replaced:
                result[name] = value
        return result


# ---------------------------------------------------------------------------------------------
# The statement.

@dataclass
class Statement:
    text: str
    commands: list

    def run(self, log: Log) -> Optional[Log]:
        """The processed log, or None if a `where` dropped it. Raises SplRuntimeError if the log
        cannot be processed."""
        row = log.fields()
        for command in self.commands:
            row = command.apply(row)
            if row is None:
                return None
        return Log.from_fields(row)


def parse_statement(text: str) -> Statement:
    """Check an SPL statement (syntax and types); SplError says what is wrong and where."""
    return _Parser(text).statement()


def _family(type_name: str) -> str:
    """Types whose values compare with each other: the numbers, or one other type alone."""
    return "number" if type_name in NUMERIC else type_name


class _Parser:
    """Recursive descent over the tokens. It also tracks the type of every field that is not
    VARCHAR after each command, so that type errors are found before any data is read."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0
        self.field_types = {name: BIGINT for name in TIME_FIELDS}

    # -- token helpers

    @property
    def token(self) -> Token:
        return self.tokens[self.pos]

    def advance(self) -> Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def error(self, message: str, token: Optional[Token] = None) -> SplError:
        token = token or self.token
        return SplError(_where(self.text, token.start) + message)

    def unexpected(self, expecting: str) -> SplError:
        shown = "<EOF>" if self.token.kind == "end" else repr(self.text[self.token.start:self.token.end])
        return self.error(f"mismatched input {shown} expecting {expecting}")

    def expect_op(self, op: str):
        if not self.token.is_op(op):
            raise self.unexpected(repr(op))
        self.advance()

    def expect_word(self, word: str):
        if not self.token.is_word(word):
            raise self.unexpected(word.upper())
        self.advance()

    def accept_word(self, *words) -> bool:
        if self.token.is_word(*words):
            self.advance()
            return True
        return False

    def adjacent_words(self) -> str:
        """A hyphenated word written without spaces, e.g. `project-away` or `-wildcard`."""
        word = self.advance().text
        while self.token.is_op("-") and self.tokens[self.pos - 1].end == self.token.start \
                and self.tokens[self.pos + 1].kind == "name" \
                and self.tokens[self.pos + 1].start == self.token.end:
            self.advance()
            word += "-" + self.advance().text
        return word.lower()

    # -- statement and commands

    def statement(self) -> Statement:
        if not self.token.is_op("*"):
            raise self.unexpected("'*' (rule-based consumption reads the whole logstore)")
        self.advance()
        commands = []
        while self.token.is_op("|"):
            self.advance()
            commands.append(self.command())
        if self.token.is_op(";"):
            self.advance()
        if self.token.kind != "end":
            raise self.unexpected("'|', ';' or <EOF>")
        return Statement(self.text, commands)

    def command(self):
        if self.token.kind != "name":
            raise self.unexpected("an SPL instruction")
        start = self.token
        name = self.adjacent_words()
        parse = {"where": self.where, "extend": self.extend, "project": self.project,
                 "project-away": self.project_away, "project-rename": self.project_rename}.get(name)
        if parse is None:
            raise self.error(f"instruction {name!r} is not supported by the SLS emulator "
                             f"(supported: where, extend, project, project-away, project-rename)", start)
        return parse()

    def where(self) -> Where:
        condition = self.expression()
        if condition.type not in (BOOLEAN, UNKNOWN):
            raise self.error(f"where needs a boolean condition, got {condition.type}")
        return Where(condition)

    def extend(self) -> Extend:
        assignments = []
        for target_token, target, expr in self.comma_list(self.assignment):
            if target in TIME_FIELDS and expr.type not in (BIGINT, INTEGER):
                raise self.error(f"{target} must be assigned an integer, got {expr.type}", target_token)
            assignments.append((target, expr))
        if len({target for target, _ in assignments}) != len(assignments):
            raise self.error("extend assigns the same field twice")
        for target, expr in assignments:
            self.set_type(target, BIGINT if target in TIME_FIELDS else expr.type)
        return Extend(assignments)

    def assignment(self):
        target_token = self.token
        target = self.field_name()
        self.expect_op("=")
        return target_token, target, self.expression()

    def wildcard_option(self) -> bool:
        if self.token.is_op("-"):
            option_token = self.token
            self.advance()
            if not (self.token.kind == "name" and self.token.start == option_token.end):
                raise self.error("expected an option name after '-'", option_token)
            option = self.adjacent_words()
            if option != "wildcard":
                raise self.error(f"unknown option -{option} (this instruction takes -wildcard)", option_token)
            return True
        return False

    def project(self) -> Project:
        wildcard = self.wildcard_option()
        retained, renames = [], []
        for output, source in self.comma_list(self.optional_rename):
            if output is None:
                retained.append(source)
            else:
                renames.append((output, source))
        self.check_renames(renames)
        matchers = [_name_matcher(pattern, wildcard) for pattern in retained]
        old_types = self.field_types
        self.field_types = {name: old_types[name] for name in TIME_FIELDS}
        for matches in matchers:
            self.field_types.update((n, t) for n, t in old_types.items() if matches(n))
        self.field_types.update((output, old_types[source]) for output, source in renames
                                if source in old_types)
        return Project(matchers, renames)

    def project_away(self) -> ProjectAway:
        wildcard = self.wildcard_option()
        matchers = [_name_matcher(pattern, wildcard) for pattern in self.comma_list(self.field_name)]
        self.field_types = {name: type_name for name, type_name in self.field_types.items()
                            if name in TIME_FIELDS or not any(m(name) for m in matchers)}
        return ProjectAway(matchers)

    def project_rename(self) -> ProjectRename:
        renames = self.comma_list(self.rename)
        self.check_renames(renames)
        moved = {output: self.field_types.pop(source, VARCHAR) for output, source in renames}
        for output, type_name in moved.items():
            self.set_type(output, type_name)
        return ProjectRename(renames)

    def optional_rename(self):
        """`field` -> (None, field); `output=field` -> (output, field)."""
        name = self.field_name()
        if self.token.is_op("="):
            self.advance()
            return name, self.field_name()
        return None, name

    def rename(self):
        output = self.field_name()
        self.expect_op("=")
        return output, self.field_name()

    def check_renames(self, renames):
        names = [name for pair in renames for name in pair]
        if any(name in TIME_FIELDS for name in names):
            raise self.error("the time fields __time__ and __time_ns_part__ cannot be renamed")
        if len({output for output, _ in renames}) != len(renames):
            raise self.error("two fields are renamed to the same name")
        if len({source for _, source in renames}) != len(renames):
            raise self.error("a field is renamed twice")

    def comma_list(self, parse_item) -> list:
        items = [parse_item()]
        while self.token.is_op(","):
            self.advance()
            items.append(parse_item())
        return items

    def field_name(self) -> str:
        token = self.token
        if token.kind == "quoted" or (token.kind == "name" and token.text.lower() not in KEYWORDS):
            self.advance()
            return token.text
        raise self.unexpected("a field name")

    def set_type(self, name: str, type_name: str):
        if type_name in (VARCHAR, UNKNOWN):
            self.field_types.pop(name, None)
        else:
            self.field_types[name] = type_name

    # -- expressions, lowest precedence first

    def expression(self) -> Expr:
        return self.disjunction()

    def disjunction(self) -> Expr:
        expr = self.conjunction()
        while self.token.is_word("or"):
            operator = self.advance()
            expr = Logical(_sql_or, self.boolean(expr, operator), self.boolean(self.conjunction(), operator))
        return expr

    def conjunction(self) -> Expr:
        expr = self.negation()
        while self.token.is_word("and"):
            operator = self.advance()
            expr = Logical(_sql_and, self.boolean(expr, operator), self.boolean(self.negation(), operator))
        return expr

    def negation(self) -> Expr:
        if self.token.is_word("not"):
            operator = self.advance()
            return Not(self.boolean(self.negation(), operator))
        return self.predicate()

    def boolean(self, expr: Expr, operator: Token) -> Expr:
        if expr.type not in (BOOLEAN, UNKNOWN):
            raise self.error(f"{operator.text.upper()} needs boolean operands, got {expr.type}", operator)
        return expr

    def predicate(self) -> Expr:
        left = self.additive()
        token = self.token
        if token.kind == "op" and token.text in _COMPARISONS:
            self.advance()
            right = self.additive()
            self.comparable(left, right, token)
            return Comparison(_COMPARISONS[token.text], left, right)
        if token.is_word("is"):
            self.advance()
            negated = self.accept_word("not")
            self.expect_word("null")
            return Not(IsNull(left)) if negated else IsNull(left)
        negated = token.is_word("not") and self.tokens[self.pos + 1].is_word("like", "in", "between")
        if negated:
            self.advance()
        operator = self.token
        if self.accept_word("like"):
            expr = self.like(left, operator)
        elif self.accept_word("in"):
            expr = self.in_list(left, operator)
        elif self.accept_word("between"):
            low = self.additive()
            self.expect_word("and")
            high = self.additive()
            self.comparable(left, low, operator)
            self.comparable(left, high, operator)
            expr = Between(left, low, high)
        else:
            return left
        return Not(expr) if negated else expr

    def like(self, value: Expr, operator: Token) -> Like:
        pattern = self.additive()
        escape = self.additive() if self.accept_word("escape") else None
        for operand in (value, pattern, escape):
            if operand is not None and operand.type not in (VARCHAR, UNKNOWN):
                raise self.error(f"LIKE works on varchar, got {operand.type}", operator)
        try:
            return Like(value, pattern, escape)
        except SplRuntimeError as exc:  # a bad literal pattern is an error of the statement
            raise self.error(str(exc), operator) from None

    def in_list(self, value: Expr, operator: Token) -> In:
        self.expect_op("(")
        candidates = self.comma_list(self.expression)
        self.expect_op(")")
        for candidate in candidates:
            self.comparable(value, candidate, operator)
        return In(value, candidates)

    def comparable(self, left: Expr, right: Expr, operator: Token):
        families = {_family(left.type), _family(right.type)} - {UNKNOWN}
        if len(families) > 1:
            raise self.error(f"Cannot apply operator: {left.type} {operator.text.upper()} {right.type}"
                             f" (cast one side, e.g. cast(x as bigint))", operator)

    def additive(self) -> Expr:
        expr = self.multiplicative()
        while self.token.is_op("+", "-"):
            expr = self.arithmetic(expr, self.advance(), self.multiplicative())
        return expr

    def multiplicative(self) -> Expr:
        expr = self.unary()
        while self.token.is_op("*", "/", "%"):
            expr = self.arithmetic(expr, self.advance(), self.unary())
        return expr

    def arithmetic(self, left: Expr, operator: Token, right: Expr) -> Arithmetic:
        for operand in (left, right):
            if operand.type not in NUMERIC + (UNKNOWN,):
                raise self.error(f"Cannot apply operator: {left.type} {operator.text} {right.type}", operator)
        types = {left.type, right.type}
        result = DOUBLE if DOUBLE in types else BIGINT if BIGINT in types or UNKNOWN in types else INTEGER
        return Arithmetic(_ARITHMETIC[operator.text], left, right, result)

    def unary(self) -> Expr:
        if self.token.is_op("-"):
            operator = self.advance()
            operand = self.unary()
            if operand.type not in NUMERIC + (UNKNOWN,):
                raise self.error(f"Cannot negate {operand.type}", operator)
            return Negate(operand, BIGINT if operand.type == UNKNOWN else operand.type)
        return self.primary()

    def primary(self) -> Expr:
        token = self.token
        if token.kind == "number":
            self.advance()
            if not token.text.isdigit():
                return Literal(float(token.text), DOUBLE)
            if int(token.text) > INTEGER_RANGES[BIGINT][1]:
                raise self.error(f"integer literal {token.text} is out of the bigint range", token)
            return Literal(int(token.text), BIGINT)
        if token.kind == "string":
            self.advance()
            return Literal(token.text, VARCHAR)
        if token.is_word("true", "false", "null"):
            self.advance()
            word = token.text.lower()
            return Literal(None, UNKNOWN) if word == "null" else Literal(word == "true", BOOLEAN)
        if token.is_word("cast"):
            return self.cast()
        if token.is_op("("):
            self.advance()
            expr = self.expression()
            self.expect_op(")")
            return expr
        if token.kind == "name" and self.tokens[self.pos + 1].is_op("("):
            raise self.error(f"function {token.text}() is not supported by the SLS emulator (only cast)")
        name = self.field_name()
        return FieldRef(name, self.field_types.get(name, VARCHAR))

    def cast(self) -> Cast:
        self.advance()
        self.expect_op("(")
        operand = self.expression()
        self.expect_word("as")
        type_token = self.token
        if not type_token.is_word(*CAST_TYPES):
            raise self.unexpected("a type (" + ", ".join(CAST_TYPES) + ")")
        self.advance()
        self.expect_op(")")
        return Cast(operand, type_token.text.lower())

