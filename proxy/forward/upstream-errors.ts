// Maps undici and socket errors to coded refusals. The reason is built from the error's code,
// never from its message: messages can carry URLs, and a URL can carry a query credential.
import { LatchkeyError, type ErrorCode } from '../errors.js'
import { MAX_UPSTREAM_HEAD_BYTES } from './headers.js'

/**
 * Node's names for an X.509 verification failure: the list in its crypto_common.cc
 * (X509ErrorCode), which reports every other X509_V_ERR_* as UNSPECIFIED, so together they are
 * every code a verification failure can carry. A verification error is a plain Error whose only
 * extra is that code (no errno, no syscall, no OpenSSL library/reason): `isVerifyError` also
 * takes one Node may name later by that shape.
 */
const X509_VERIFY_CODES = new Set([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_CRL',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'UNABLE_TO_DECRYPT_CRL_SIGNATURE',
  'UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY',
  'CERT_SIGNATURE_FAILURE',
  'CRL_SIGNATURE_FAILURE',
  'CERT_NOT_YET_VALID',
  'CERT_HAS_EXPIRED',
  'CRL_NOT_YET_VALID',
  'CRL_HAS_EXPIRED',
  'ERROR_IN_CERT_NOT_BEFORE_FIELD',
  'ERROR_IN_CERT_NOT_AFTER_FIELD',
  'ERROR_IN_CRL_LAST_UPDATE_FIELD',
  'ERROR_IN_CRL_NEXT_UPDATE_FIELD',
  'OUT_OF_MEM',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'CERT_CHAIN_TOO_LONG',
  'CERT_REVOKED',
  'INVALID_CA',
  'PATH_LENGTH_EXCEEDED',
  'INVALID_PURPOSE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'HOSTNAME_MISMATCH',
  'UNSPECIFIED',
])

/** The code forward/pools.ts gives a certificate with no subjectAltName (Node would match its CN). */
export const NO_SUBJECT_ALT_NAME = 'CERT_NO_SUBJECT_ALT_NAME'

function isVerifyError(e: object, code: string): boolean {
  if (X509_VERIFY_CODES.has(code)) return true
  return Object.getPrototypeOf(e) === Error.prototype && /^[A-Z][A-Z0-9_]+$/.test(code) && !/^(ERR|UND|HPE)_/.test(code) && !('errno' in e) && !('syscall' in e) && !('library' in e)
}

/** Bytes that were not TLS where a TLS record was due: a plain-HTTP (or other) server on an https:// port. */
const NOT_TLS = new Set(['ERR_SSL_WRONG_VERSION_NUMBER', 'ERR_SSL_PACKET_LENGTH_TOO_LONG', 'ERR_SSL_RECORD_LAYER_FAILURE', 'ERR_SSL_HTTP_REQUEST', 'ERR_SSL_HTTPS_PROXY_REQUEST'])
/** The upstream's alert says it wants a client certificate (TLS 1.3 has an alert for it). */
const CLIENT_CERT_REQUIRED = new Set(['ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED', 'ERR_SSL_TLSV1_ALERT_CERTIFICATE_REQUIRED'])
/** TLS 1.2's generic handshake_failure alert (OpenSSL 3.5 renamed it): no client certificate, or nothing in common. */
const HANDSHAKE_REFUSED = new Set(['ERR_SSL_SSLV3_ALERT_HANDSHAKE_FAILURE', 'ERR_SSL_SSL/TLS_ALERT_HANDSHAKE_FAILURE'])
/** No TLS version both sides accept (the sidecar: 1.2 or later). */
const NO_COMMON_VERSION = new Set(['ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION', 'ERR_SSL_UNSUPPORTED_PROTOCOL', 'ERR_SSL_NO_PROTOCOLS_AVAILABLE', 'ERR_SSL_WRONG_SSL_VERSION', 'ERR_SSL_VERSION_TOO_LOW'])

/** A TLS failure as the agent should read it, or null when `code` is not one. The credential was never sent in any of these. */
function tlsError(e: object, code: string): LatchkeyError | null {
  const tls = (reason: string) => new LatchkeyError('LK_UPSTREAM_TLS', `${reason} (${code})`)
  if (code === NO_SUBJECT_ALT_NAME) return tls("the upstream's TLS certificate has no subjectAltName (a host named only in its CN is not accepted)")
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID') return tls("the upstream's TLS certificate does not name this host")
  if (isVerifyError(e, code)) return tls("the upstream's TLS certificate was not accepted")
  if (NOT_TLS.has(code)) return tls('the upstream does not speak TLS on this port')
  if (CLIENT_CERT_REQUIRED.has(code)) return tls('the TLS handshake failed: the upstream requires a client certificate')
  if (HANDSHAKE_REFUSED.has(code)) return tls('the TLS handshake failed: the upstream refused it (it may require a client certificate, or share no cipher with the sidecar)')
  if (NO_COMMON_VERSION.has(code)) return tls('the TLS handshake failed: the upstream offers no TLS version the sidecar accepts (1.2 or later)')
  if (code.startsWith('ERR_SSL_') || code.startsWith('ERR_TLS_') || code === 'EPROTO') return tls('the TLS handshake failed')
  return null
}

/** Methods a client may repeat after a failure on its own (RFC 9110 §9.2.2): the same effect once or twice. */
const IDEMPOTENT: ReadonlySet<string> = new Set(['GET', 'HEAD', 'OPTIONS', 'PUT', 'DELETE'])

/**
 * A failure that may come after the upstream received the request (the connection closed or
 * reset under it, no answer in time): repeating a POST then could do twice what it asked for, so
 * such a failure is retryable only for an idempotent method. One before anything was sent
 * (refused, unresolvable, TLS) is retryable as its code says.
 */
export function afterSending(code: ErrorCode, reason: string, method: string): LatchkeyError {
  if (IDEMPOTENT.has(method)) return new LatchkeyError(code, reason)
  return new LatchkeyError(code, `${reason}; the request may have reached it, and a ${method} is not safe to repeat`, null, false)
}

/**
 * `method`: the request's, when the error ended a forwarded request (see afterSending).
 * `headArrived`: whether the upstream's final response head had come when the error did.
 */
export function upstreamError(err: unknown, method = 'GET', headArrived = true): LatchkeyError {
  if (err instanceof LatchkeyError) return err
  const e = err as { code?: string; name?: string; message?: string } | null
  const code = e?.code ?? 'UNKNOWN'
  // A response undici's parser refused, or one no request asked for (an unsolicited 100 or 101):
  // the same answer would come again, so it is the upstream's protocol, not worth a retry. The
  // message is only compared, never repeated.
  if (e?.name === 'HTTPParserError') return new LatchkeyError('LK_UPSTREAM_PROTOCOL', 'the upstream sent an invalid HTTP response')
  if (code === 'UND_ERR_SOCKET' && e?.message === 'bad response') {
    // undici's only 'bad response' while a request is under way (with none, no handler hears it).
    // The sidecar sends no Expect upstream (it answers the agent's itself), and undici reads no
    // further than a 100 it did not ask for, though RFC 9110 §15.2 would have it skipped.
    return new LatchkeyError('LK_UPSTREAM_PROTOCOL', 'the upstream sent a 100 Continue that no request asked for, which the sidecar cannot read past')
  }
  if (code === 'UND_ERR_SOCKET' && e?.message === 'bad upgrade') {
    return new LatchkeyError('LK_UPSTREAM_PROTOCOL', 'the upstream switched protocols (101) on a request that asked for no upgrade')
  }
  switch (code) {
    case 'UND_ERR_CONNECT_TIMEOUT':
      return new LatchkeyError('LK_UPSTREAM_TIMEOUT', 'connecting to the upstream timed out')
    case 'UND_ERR_HEADERS_TIMEOUT':
      return afterSending('LK_UPSTREAM_TIMEOUT', 'the upstream did not send response headers in time', method)
    case 'UND_ERR_BODY_TIMEOUT':
      return afterSending('LK_UPSTREAM_TIMEOUT', 'the upstream stopped sending the response body', method)
    case 'ECONNREFUSED':
      return new LatchkeyError('LK_UPSTREAM_UNREACHABLE', 'the upstream refused the connection')
    case 'ECONNRESET':
    case 'UND_ERR_SOCKET':
    case 'EPIPE':
      return afterSending('LK_UPSTREAM_UNREACHABLE', 'the upstream closed the connection', method)
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
      return new LatchkeyError('LK_UPSTREAM_UNREACHABLE', 'the upstream address is unreachable')
    case 'ETIMEDOUT':
      return new LatchkeyError('LK_UPSTREAM_TIMEOUT', 'the upstream connection timed out')
    case 'HPE_INVALID_CONSTANT':
    case 'HPE_INVALID_HEADER_TOKEN':
    case 'UND_ERR_INFO':
      return new LatchkeyError('LK_UPSTREAM_PROTOCOL', 'the upstream sent an invalid HTTP response')
    // undici asserts what its parser hands it (a status below 100, which llhttp lets through):
    // the same response would fail again, so not "unreachable, retry".
    case 'ERR_ASSERTION':
      return new LatchkeyError('LK_UPSTREAM_PROTOCOL', 'the upstream sent an HTTP response the sidecar cannot read')
    case 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH':
      // undici reports a head its parser refused after a Content-Length line (a second one, a bad
      // header name) as a body that did not match that length: with no head arrived, there was no body.
      if (!headArrived) return new LatchkeyError('LK_UPSTREAM_PROTOCOL', 'the upstream sent an invalid HTTP response')
      return new LatchkeyError('LK_UPSTREAM_PROTOCOL', "the upstream's response body did not match its Content-Length")
    case 'UND_ERR_HEADERS_OVERFLOW':
      return new LatchkeyError('LK_UPSTREAM_PROTOCOL', `the upstream's response headers were too large (over ${MAX_UPSTREAM_HEAD_BYTES / 1024} KiB)`)
    case 'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH':
      return new LatchkeyError('LK_BAD_REQUEST', 'the request body did not match its Content-Length')
    default: {
      const tls = e ? tlsError(e, code) : null
      if (tls) return tls
      if (code.startsWith('HPE_')) return new LatchkeyError('LK_UPSTREAM_PROTOCOL', `the upstream sent an invalid HTTP response (${code})`)
      return afterSending('LK_UPSTREAM_UNREACHABLE', `the upstream request failed (${code})`, method)
    }
  }
}

/** The upstream's connection ending under a call: closed (undici's "other side closed") or reset. */
const CLOSED_UNDER = new Set(['UND_ERR_SOCKET', 'ECONNRESET', 'EPIPE'])

/**
 * A failure once the final response head has arrived (its body under way). A body read to the
 * close ends without error, so a close or reset here ends one its head framed (a Content-Length
 * not reached, chunks with no last one): the upstream broke the framing it chose, a protocol
 * fault, not an upstream out of reach (ARCHITECTURE.md, the forward stage's outcomes).
 */
export function bodyError(err: unknown, method: string): LatchkeyError {
  const e = err as { code?: unknown; message?: unknown } | null
  const code = typeof e?.code === 'string' ? e.code : ''
  if (CLOSED_UNDER.has(code) && !(code === 'UND_ERR_SOCKET' && (e?.message === 'bad response' || e?.message === 'bad upgrade'))) {
    return new LatchkeyError('LK_UPSTREAM_PROTOCOL', `the upstream ${code === 'UND_ERR_SOCKET' ? 'closed' : 'reset'} the connection before the end of the body its response head announced`)
  }
  return upstreamError(err, method, true)
}
