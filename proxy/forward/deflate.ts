// `Content-Encoding: deflate` decoded as the clients read it. RFC 9110 §8.4.1.2 names the zlib
// format (RFC 1950: a two-byte header, then deflate); some servers send raw deflate (RFC 1951, no
// header: IIS long did, and an upstream ignoring the sidecar's Accept-Encoding: identity still
// can). undici's fetch and browsers take both, deciding by the first bytes; createInflate alone cut
// the raw one 502 after its head. Which one it is, is decided once, by the zlib header's own
// check: a raw stream from zlib never starts with CM 8 (its first block's low bits are never 1000).
import { Transform, type TransformCallback } from 'node:stream'
import { createInflate, createInflateRaw } from 'node:zlib'

/** A zlib header (RFC 1950 §2.2): CM 8 (deflate), a window of at most 32 KiB, and FCHECK making the pair a multiple of 31. */
function isZlibHeader(b: Buffer): boolean {
  return (b[0]! & 0x0f) === 8 && b[0]! >> 4 <= 7 && ((b[0]! << 8) | b[1]!) % 31 === 0
}

/**
 * Inflates zlib-wrapped or raw deflate, as the first two bytes say. Back-pressure holds as the
 * inflater's own: output this stream's reader has not taken pauses the inflater, whose unfinished
 * writes then hold this stream's (and so the upstream).
 */
class DeflateDecoder extends Transform {
  private inflater: Transform | null = null
  /** A first byte alone (a one-byte chunk): kept until the second says which format. */
  private first: Buffer | null = null

  override _transform(chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback): void {
    if (this.inflater === null) {
      const bytes = this.first === null ? chunk : Buffer.concat([this.first, chunk])
      if (bytes.length < 2) {
        this.first = bytes
        return done()
      }
      this.first = null
      this.start(isZlibHeader(bytes) ? createInflate() : createInflateRaw())
      chunk = bytes
    }
    this.inflater!.write(chunk, (err) => done(err ?? undefined))
  }

  override _flush(done: TransformCallback): void {
    // No body, or one byte of it: zlib's own verdict (an empty input is an error to it, as before).
    if (this.inflater === null) this.start(createInflate()).write(this.first ?? Buffer.alloc(0))
    this.inflater!.once('end', () => done())
    this.inflater!.end()
  }

  override _read(size: number): void {
    this.inflater?.resume()
    super._read(size)
  }

  override _destroy(err: Error | null, done: (err: Error | null) => void): void {
    this.inflater?.destroy()
    done(err)
  }

  private start(inflater: Transform): Transform {
    this.inflater = inflater
    inflater.on('data', (d: Buffer) => {
      if (!this.push(d)) inflater.pause()
    })
    inflater.on('error', (err) => this.destroy(err))
    return inflater
  }
}

export function createDeflateDecoder(): Transform {
  return new DeflateDecoder()
}
