"""A fault-injecting HTTP/1.1 proxy on loopback, in front of an object-store server: a fixed
delay once per request (a bucket's latency), a burst of error answers (503, or 403 for bad
credentials), and connections dropped mid-response. Tests run it in-process (FaultProxy);
the benchmark runs it as its own process, so its CPU is not counted as the reader's:

    python -m bench.objstore_proxy --target http://127.0.0.1:9000 --delay 0.05

prints one JSON line {"url": ...} and serves until SIGTERM (`spawn()` does this from
Python); `control(url, ...)` sets its faults and reads its counters from another process
(GET /_proxy/stats, /_proxy/set?...).

The delay is applied once, when a whole request has arrived: a byte-level proxy that delays
each chunk would charge an S3 GET (written in two chunks by aiobotocore) twice. Requests
are parsed (Content-Length and chunked bodies, `Expect: 100-continue`), so an answer the
proxy makes up keeps the client's connection usable, as a real server's would. Stdlib only.
"""
import argparse
import collections
import contextlib
import json
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

_CONTROL = '/_proxy/'
_REASONS = {403: 'Forbidden', 404: 'Not Found', 429: 'Too Many Requests',
            500: 'Internal Server Error', 502: 'Bad Gateway', 503: 'Service Unavailable'}
# The error codes each store answers with: clients map them to exceptions (s3fs turns
# InvalidAccessKeyId into PermissionError; gcsfs reads the JSON error's code).
_S3_CODES = {403: 'InvalidAccessKeyId', 429: 'SlowDown', 500: 'InternalError',
             503: 'ServiceUnavailable'}


class _Conn:
    """One socket with a buffered reader, closed once."""

    def __init__(self, sock):
        # No Nagle: a response leaves in pieces (head, body), and Nagle holding the last
        # piece until the peer's delayed ACK added about 40 ms to every request.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.rfile = sock, sock.makefile('rb')

    def close(self):
        for close in (self.rfile.close, lambda: self.sock.shutdown(socket.SHUT_RDWR),
                      self.sock.close):
            try:
                close()
            except OSError:
                pass


def _read_head(rfile):
    """The start line and the header lines of a message (None at a clean end of stream)."""
    lines = []
    while True:
        line = rfile.readline(65537)
        if not line:
            if lines:
                raise ConnectionError('stream ended inside a message head')
            return None
        if line in (b'\r\n', b'\n'):
            if lines:
                return lines
            continue  # stray blank line between messages (RFC 9112 2.2)
        lines.append(line)


def _header(lines, name):
    name = name.lower().encode()
    for line in lines[1:]:
        key, _, value = line.partition(b':')
        if key.strip().lower() == name:
            return value.strip().decode('latin-1')
    return None


def _copy_body(rfile, send, lines, limit=None):
    """Copy a body framed by Content-Length or chunked encoding; returns the bytes copied.
    With `limit`, stop after that many bytes (a dropped connection) and return -1."""
    sent = 0

    def out(data):
        nonlocal sent
        if limit is not None and sent + len(data) > limit:
            send(data[:limit - sent])
            raise _Dropped
        send(data)
        sent += len(data)

    if (_header(lines, 'transfer-encoding') or '').lower().endswith('chunked'):
        while True:
            size_line = rfile.readline(65537)
            out(size_line)
            size = int(size_line.split(b';')[0], 16)
            if size == 0:
                while True:  # trailers, up to the blank line
                    line = rfile.readline(65537)
                    out(line)
                    if line in (b'\r\n', b'\n', b''):
                        return sent
            _copy_exact(rfile, size + 2, out)
    length = _header(lines, 'content-length')
    if length is not None:
        _copy_exact(rfile, int(length), out)
        return sent
    return None  # framed by the end of the stream: the caller copies until close


def _copy_exact(rfile, n, out):
    while n > 0:
        data = rfile.read(min(n, 1 << 16))
        if not data:
            raise ConnectionError('stream ended inside a body')
        out(data)
        n -= len(data)


class _Held:
    """Sends each piece one step late, so that a response is counted before its client has
    all of it: a test that reads the counters right after its read sees that read."""

    def __init__(self, send):
        self.send, self.last = send, b''

    def __call__(self, data):
        if self.last:
            self.send(self.last)
        self.last = bytes(data)

    def flush(self):
        if self.last:
            self.send(self.last)
            self.last = b''


class _Stale(Exception):
    """The server closed the connection before answering."""


class _Dropped(Exception):
    """The proxy cut a response short on purpose."""


class FaultProxy:
    """A threaded proxy for http://host:port `target`. `flavor` ('s3' or 'gcs') shapes the
    error bodies it makes up, as that store's clients parse them. Faults apply to requests
    for which `match(method, path)` is true (all by default); set them with `set()`."""

    def __init__(self, target, flavor='s3', host='127.0.0.1', port=0):
        parsed = urllib.parse.urlsplit(target)
        self.target = (parsed.hostname, parsed.port or 80)
        self.flavor = flavor
        self._lock = threading.Lock()
        self.delay, self._fail, self._drop, self.match = 0.0, None, None, None
        self.log = collections.deque(maxlen=100_000)  # (method, path, status or 'dropped')
        self.reset_stats()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._serve(self.request)

        class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 256

        self._server = Server((host, port), Handler)
        self.url = 'http://%s:%d' % self._server.server_address[:2]
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name='objstore-proxy', daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def set(self, delay=None, fail=None, count=1, drop=None, match=None):
        """delay: seconds added once per request. fail: an HTTP status (503, 403, ...) that
        answers the next `count` matching requests (count=None: all of them) without
        forwarding them. drop: a number of body bytes after which the next `count` matching
        responses are cut off (connection closed; a shorter body goes through whole and
        uses up one count all the same). match(method, path) picks the requests
        that faults apply to. Arguments left out keep their setting; clear() resets all."""
        with self._lock:
            if delay is not None:
                self.delay = float(delay)
            if fail is not None:
                self._fail = [int(fail), count]
            if drop is not None:
                self._drop = [int(drop), count]
            if match is not None:
                self.match = match

    def clear(self):
        """No delay, no faults."""
        with self._lock:
            self.delay, self._fail, self._drop, self.match = 0.0, None, None, None

    def reset_stats(self):
        with self._lock:
            self._stats = dict(requests=0, forwarded=0, failed=0, dropped=0,
                               bytes_in=0, bytes_out=0, delayed_s=0.0)
            self.log.clear()

    def stats(self):
        """Counters since the last reset: requests seen, forwarded to the server, answered
        with an error, dropped; body bytes sent up (bytes_in) and down (bytes_out); and the
        CPU seconds of this process so far (cpu_s: the proxy's own, when it runs alone)."""
        with self._lock:
            return dict(self._stats, cpu_s=time.process_time())

    def _count(self, **add):
        with self._lock:
            for key, value in add.items():
                self._stats[key] += value

    def _take(self, kind, method, path):
        """The pending fault of `kind` for this request, counted down (None: none)."""
        with self._lock:
            fault = self._fail if kind == 'fail' else self._drop
            if fault is None or (self.match is not None and not self.match(method, path)):
                return None
            value, count = fault
            if count is not None:
                fault[1] -= 1
                if fault[1] <= 0:
                    if kind == 'fail':
                        self._fail = None
                    else:
                        self._drop = None
            return value

    # ---- one client connection -----------------------------------------------------
    def _serve(self, sock):
        client, upstream = _Conn(sock), None
        try:
            while True:
                lines = _read_head(client.rfile)
                if lines is None:
                    return
                method, target, version = lines[0].decode('latin-1').split(None, 2)
                path = urllib.parse.urlsplit(target).path
                if path.startswith(_CONTROL):
                    self._control(client, method, target, lines)
                    continue
                if (_header(lines, 'expect') or '').lower() == '100-continue':
                    # Answer it here: the server then gets the body without waiting.
                    client.sock.sendall(b'HTTP/1.1 100 Continue\r\n\r\n')
                    lines = [line for line in lines if not line.lower().startswith(b'expect:')]
                body = bytearray()
                _copy_body(client.rfile, body.extend, lines)
                self._count(requests=1, bytes_in=len(body))
                with self._lock:
                    delay = self.delay
                if delay:
                    time.sleep(delay)
                    self._count(delayed_s=delay)
                status = self._take('fail', method, path)
                if status is not None:
                    self._answer(client, method, path, status)
                    continue
                drop = self._take('drop', method, path)
                for reused in (upstream is not None, False):
                    if upstream is None:
                        upstream = _Conn(socket.create_connection(self.target))
                    try:
                        try:
                            upstream.sock.sendall(b''.join(lines) + b'\r\n' + bytes(body))
                        except (BrokenPipeError, ConnectionResetError):
                            raise _Stale from None
                        keep = self._relay(upstream, client, method, path, drop)
                        break
                    except _Stale:
                        # A kept-alive server connection closed while idle: once more on
                        # a new one, as any proxy does (not a fault of this one's making).
                        upstream.close()
                        upstream = None
                        if not reused:
                            raise ConnectionError('server closed the connection') from None
                if not keep:
                    return
        except _Dropped:
            return
        except (OSError, ValueError):
            return  # a client or server went away: close both, as a real hop would
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    def _relay(self, upstream, client, method, path, drop):
        """Forward one response; returns whether the client's connection stays open."""
        while True:
            try:
                head = _read_head(upstream.rfile)
            except ConnectionResetError:
                head = None
            if head is None:
                raise _Stale
            status = int(head[0].split()[1])
            if status >= 200:
                break
            # an interim 1xx (the client's 100-continue was answered already): skip it
        send = _Held(client.sock.sendall)
        send(b''.join(head) + b'\r\n')
        no_body = method == 'HEAD' or status in (204, 304)
        try:
            sent = 0 if no_body else _copy_body(upstream.rfile, send, head, limit=drop)
            until_close = sent is None
            if until_close:  # framed by the server closing: so must the client's connection
                sent = 0
                while data := upstream.rfile.read1(1 << 16):
                    if drop is not None and sent + len(data) > drop:
                        send(data[:drop - sent])
                        raise _Dropped
                    send(data)
                    sent += len(data)
        except _Dropped:
            self._count(forwarded=1, dropped=1)
            self.log.append((method, path, 'dropped'))
            send.flush()
            raise
        self._count(forwarded=1, bytes_out=sent)
        self.log.append((method, path, status))
        send.flush()
        version = head[0].split()[0]
        connection = (_header(head, 'connection') or '').lower()
        return not (until_close or connection == 'close'
                    or (version == b'HTTP/1.0' and connection != 'keep-alive'))

    def _answer(self, client, method, path, status):
        """An error made up by the proxy, in the store's own format; keeps the connection."""
        reason = _REASONS.get(status, 'Error')
        if self.flavor == 'gcs':
            ctype = 'application/json; charset=UTF-8'
            body = json.dumps({'error': {'code': status, 'message': f'{reason} (proxy)',
                                         'errors': [{'message': reason}]}}).encode()
        else:
            ctype = 'application/xml'
            code = _S3_CODES.get(status, reason.replace(' ', ''))
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f'<Message>{reason} (proxy)</Message></Error>').encode()
        head = (f'HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n'
                f'Content-Length: {len(body)}\r\n\r\n').encode()
        self._count(failed=1)
        self.log.append((method, path, status))
        client.sock.sendall(head if method == 'HEAD' else head + body)

    def _control(self, client, method, target, lines):
        """/_proxy/stats (counters), /_proxy/reset (zero them), /_proxy/clear (no
        faults), /_proxy/set?delay=&fail=&count=&drop= (count=all: every request)."""
        _copy_body(client.rfile, lambda data: None, lines)
        parts = urllib.parse.urlsplit(target)
        action = parts.path[len(_CONTROL):]
        query = dict(urllib.parse.parse_qsl(parts.query))
        if action == 'set':
            count = query.get('count', '1')
            self.set(delay=query.get('delay'), fail=query.get('fail'),
                     drop=query.get('drop'), count=None if count == 'all' else int(count))
        elif action == 'reset':
            self.reset_stats()
        elif action == 'clear':
            self.clear()
        elif action != 'stats':
            body = b'unknown control ' + action.encode()
            client.sock.sendall(b'HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s'
                                % (len(body), body))
            return
        body = json.dumps(self.stats()).encode()
        client.sock.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
                            b'Content-Length: %d\r\n\r\n%s' % (len(body), body))


def control(url, action='stats', **params):
    """Drive a proxy in another process: control(url) -> counters; control(url, 'set',
    delay=0.05); control(url, 'reset')."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    with urllib.request.urlopen(f'{url}{_CONTROL}{action}?{query}', timeout=10) as answer:
        return json.loads(answer.read())


@contextlib.contextmanager
def spawn(target, flavor='s3', delay=0.0):
    """This proxy in a child process, for the benchmark: its CPU is not the reader's.
    Yields its url; stopped (by its pid) on exit."""
    proc = subprocess.Popen([sys.executable, __file__, '--target', target, '--flavor', flavor,
                             '--delay', str(delay)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f'the proxy did not start (exit code {proc.wait()})')
        yield json.loads(line)['url']
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--target', required=True, help='http://host:port of the server')
    parser.add_argument('--flavor', default='s3', choices=['s3', 'gcs'])
    parser.add_argument('--delay', type=float, default=0.0, help='seconds per request')
    parser.add_argument('--port', type=int, default=0)
    args = parser.parse_args(argv)
    proxy = FaultProxy(args.target, args.flavor, port=args.port).start()
    proxy.set(delay=args.delay)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(json.dumps({'url': proxy.url}), flush=True)
    done.wait()
    proxy.stop()


if __name__ == '__main__':
    main()
