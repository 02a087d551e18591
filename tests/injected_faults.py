"""Changes made to the forwarder in a test's subprocess (tests/forwarder_process.py's with_fault):
each takes the forwarder module and the test's arguments."""
import os
import socket
import ssl
import threading


def without_wrap_socket(fwd):
    """Python 3.12+ has no ssl.wrap_socket: TLS must work without it."""
    ssl.__dict__.pop("wrap_socket", None)


def stuck_worker_loop(fwd, stick_path):
    """Once stick_path exists, the SDK worker loop blocks for good in its next round, as a deadlock would."""
    clean_shard_consumer = fwd.WafConsumerWorker.clean_shard_consumer

    def stuck(self, owned_shards):
        if os.path.exists(stick_path):
            threading.Event().wait()
        clean_shard_consumer(self, owned_shards)

    fwd.WafConsumerWorker.clean_shard_consumer = stuck


def failing_encoder(fwd, failures):
    """The encoder raises on its first `failures` batches, as a bug with some rare log would."""
    encode, remaining = fwd.MessageEncoder.encode, iter(range(failures))

    def flaky(self, groups):
        if next(remaining, None) is not None:
            raise RuntimeError("injected encoder failure")
        return encode(self, groups)

    fwd.MessageEncoder.encode = flaky


def sdk_without(fwd, class_name, method):
    """An SDK whose class_name.method no longer does what the forwarder relies on."""
    setattr(getattr(fwd, class_name), method, lambda self, *args, **kwargs: None)


def resolver(fwd, name, addresses):
    """`name` resolves to these IPv4 addresses, in this order, as a DNS answer with several A records
    would (other names resolve as usual)."""
    resolve = socket.getaddrinfo

    def answer(host, port, family=0, type=0, proto=0, flags=0):
        if host != name:
            return resolve(host, port, family, type, proto, flags)
        return [(socket.AF_INET, type or socket.SOCK_STREAM, proto, "", (address, int(port)))
                for address in addresses]

    socket.getaddrinfo = answer


def endless_encoding(fwd):
    """Encoding a batch never ends, as with a log that makes the encoder work for ever."""
    def endless(self, groups):
        threading.Event().wait()

    fwd.MessageEncoder.encode = endless
