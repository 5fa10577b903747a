// UTF-8 read strictly. Buffer#toString('utf8') reads bytes that are not UTF-8 (a stray byte, an
// overlong form, a lone surrogate) as U+FFFD, so a text nobody sent was checked and kept.

/** Throws (ERR_ENCODING_INVALID_ENCODED_DATA) on bytes that are not UTF-8; a byte order mark is kept as a character. */
export const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })
