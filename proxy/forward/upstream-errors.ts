// Maps undici and socket errors to coded refusals. The reason is built from the error's code,
// never from its message: messages can carry URLs, and a URL can carry a query credential.
import { LatchkeyError } from '../errors.js'

const TLS_CODES = new Set([
  'CERT_HAS_EXPIRED',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'ERR_TLS_CERT_ALTNAME_INVALID',
  'CERT_NOT_YET_VALID',
  'ERR_SSL_WRONG_VERSION_NUMBER',
  'EPROTO',
])

export function upstreamError(err: unknown): LatchkeyError {
  if (err instanceof LatchkeyError) return err
  const e = err as { code?: string; name?: string; message?: string } | null
  const code = e?.code ?? 'UNKNOWN'
  // A response undici's parser refused, or one no request asked for (an unsolicited 100 or 101):
  // the same answer would come again, so it is the upstream's protocol, not worth a retry. The
  // message is only compared, never repeated.
  if (e?.name === 'HTTPParserError' || (code === 'UND_ERR_SOCKET' && (e?.message === 'bad response' || e?.message === 'bad upgrade'))) {
    return new LatchkeyError('LK_UPSTREAM_PROTOCOL', 'the upstream sent an invalid HTTP response')
  }
  switch (code) {
    case 'UND_ERR_CONNECT_TIMEOUT':
      return new LatchkeyError('LK_UPSTREAM_TIMEOUT', 'connecting to the upstream timed out')
    case 'UND_ERR_HEADERS_TIMEOUT':
      return new LatchkeyError('LK_UPSTREAM_TIMEOUT', 'the upstream did not send response headers in time')
    case 'UND_ERR_BODY_TIMEOUT':
      return new LatchkeyError('LK_UPSTREAM_TIMEOUT', 'the upstream stopped sending the response body')
    case 'ECONNREFUSED':
      return new LatchkeyError('LK_UPSTREAM_UNREACHABLE', 'the upstream refused the connection')
    case 'ECONNRESET':
    case 'UND_ERR_SOCKET':
    case 'EPIPE':
      return new LatchkeyError('LK_UPSTREAM_UNREACHABLE', 'the upstream closed the connection')
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
      return new LatchkeyError('LK_UPSTREAM_UNREACHABLE', 'the upstream address is unreachable')
    case 'ETIMEDOUT':
      return new LatchkeyError('LK_UPSTREAM_TIMEOUT', 'the upstream connection timed out')
    case 'HPE_INVALID_CONSTANT':
    case 'HPE_INVALID_HEADER_TOKEN':
    case 'UND_ERR_INFO':
      return new LatchkeyError('LK_UPSTREAM_PROTOCOL', 'the upstream sent an invalid HTTP response')
    case 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH':
      return new LatchkeyError('LK_UPSTREAM_PROTOCOL', "the upstream's response body did not match its Content-Length")
    case 'UND_ERR_HEADERS_OVERFLOW':
      return new LatchkeyError('LK_UPSTREAM_PROTOCOL', "the upstream's response headers were too large")
    case 'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH':
      return new LatchkeyError('LK_BAD_REQUEST', 'the request body did not match its Content-Length')
    default:
      if (TLS_CODES.has(code) || code.startsWith('ERR_SSL') || code.startsWith('ERR_TLS')) {
        return new LatchkeyError('LK_UPSTREAM_TLS', `the upstream's TLS certificate was not accepted (${code})`)
      }
      if (code.startsWith('HPE_')) return new LatchkeyError('LK_UPSTREAM_PROTOCOL', `the upstream sent an invalid HTTP response (${code})`)
      return new LatchkeyError('LK_UPSTREAM_UNREACHABLE', `the upstream request failed (${code})`)
  }
}
