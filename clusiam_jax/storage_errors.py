"""Which errors of the cloud clients (gcsfs, s3fs and what they wrap: aiohttp, botocore,
urllib3, requests) are worth another try, which mean a missing object or bad credentials,
and what a one-line message says of them: storage's retry loop (storage._retried) asks
these. Decided by exception type and HTTP status, never by message text; the clients'
modules are looked up in sys.modules only, so a local run never imports them."""
import errno
import sys

# HTTP answers worth another try: timeouts, throttling, server errors.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# s3fs turns ServiceUnavailable/SlowDown (503) into EBUSY and InternalError (500) into
# EREMOTEIO; the rest are a connection's.
_TRANSIENT_ERRNO = frozenset({errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET,
                              errno.ECONNABORTED, errno.EPIPE})
# The clients' own types for a cut or failed connection (looked up only once imported: a
# local run never imports them): aiohttp's (gcsfs, and s3fs for a cut body; ClientPayloadError
# is no OSError), botocore's, urllib3's and requests' (gcsfs answers a 502 with ProxyError).
_TRANSIENT_TYPES = (('aiohttp', 'ClientError'), ('botocore.exceptions', 'HTTPClientError'),
                    ('botocore.exceptions', 'ConnectionError'),
                    ('botocore.parsers', 'ResponseParserError'),
                    ('urllib3.exceptions', 'ProtocolError'),
                    ('requests.exceptions', 'ConnectionError'), ('requests.exceptions', 'Timeout'),
                    ('requests.exceptions', 'ChunkedEncodingError'),
                    ('http.client', 'IncompleteRead'))


def http_status(error: BaseException):
    """The HTTP status of a store's answer that an error or its cause carries (gcsfs's
    HttpError.code, aiohttp's ClientResponseError.status, botocore's response under s3fs's
    translated OSError), or None. Not any `code`: aiohttp's parser gives a cut body 400."""
    aiohttp = sys.modules.get('aiohttp')
    for _ in range(4):
        if error is None:
            return None
        response = getattr(error, 'response', None)
        status = (response.get('ResponseMetadata', {}).get('HTTPStatusCode')
                  if isinstance(response, dict) else None)
        if type(error).__module__.startswith('gcsfs'):
            status = getattr(error, 'code', None)
        elif aiohttp is not None and isinstance(error, aiohttp.ClientResponseError):
            status = error.status
        if isinstance(status, int):
            return status
        error = error.__cause__
    return None


def forbidden(error: BaseException) -> bool:
    """Bad or missing credentials: s3fs raises PermissionError, gcsfs OSError('Forbidden')."""
    return (isinstance(error, PermissionError) or http_status(error) in (401, 403)
            or (type(error) is OSError and str(error).startswith('Forbidden')))


def transient(error: BaseException) -> bool:
    """HTTP 408/429/5xx, timeouts and dropped connections: worth another try; the rest is not.
    Decided by type and status, never by message text (a path may hold '503')."""
    if forbidden(error) or isinstance(error, (FileNotFoundError, FileExistsError,
                                              IsADirectoryError, NotADirectoryError)):
        return False
    status = http_status(error)
    if status is not None:
        return status in _TRANSIENT_STATUS
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNO:
        return True
    return _of_types(error, _TRANSIENT_TYPES)


def _of_types(error: BaseException, types) -> bool:
    """Whether `error` is one of these (module, name) types: only modules already imported
    are looked at, so a client that was never used costs no import."""
    for module, name in types:
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type) and isinstance(error, kind):
            return True
    return False


# The clients' own error types besides OSError, which storage._retried turns into DataErrors;
# any other exception (a TypeError from a bug) passes through unchanged.
_CLIENT_TYPES = _TRANSIENT_TYPES + (('gcsfs.retry', 'HttpError'),
                                    ('botocore.exceptions', 'BotoCoreError'),
                                    ('botocore.exceptions', 'ClientError'))


def client_error(error: BaseException) -> bool:
    return isinstance(error, OSError) or _of_types(error, _CLIENT_TYPES)


def missing(error: BaseException) -> bool:
    return isinstance(error, FileNotFoundError) or http_status(error) == 404


def reason(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return 'no such object or bucket'
    if forbidden(error):
        return 'access denied (check the credentials in the environment)'
    return (str(error).splitlines() or [type(error).__name__])[0][:300]


def precondition_failed(error: BaseException) -> bool:
    """HTTP 412; s3fs keeps botocore's answer only as the context of its OSError."""
    return any(http_status(e) == 412 for e in (error, error.__context__) if e is not None)
