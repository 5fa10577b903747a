// Calls admitted and not yet finished, with the client socket each one holds (a keep-alive
// connection, a tunnel, a WebSocket): what a revocation cuts. An intrusive doubly-linked list
// through the call contexts, not a Map: linking and unlinking allocate nothing, while a Map's
// hash table, rebuilt as calls come and go, kept finished contexts reachable long enough to be
// promoted to the old generation (measured: half the sidecar's promotion under load).
import type { Socket } from 'node:net'
import type { CallContext } from './context.js'

export class LiveCalls {
  private head: CallContext | null = null
  /** How many calls are linked: the calls-in-flight gauge, and a leak shows there first. */
  size = 0

  add(ctx: CallContext, socket: Socket): void {
    if (ctx.liveSocket) return
    ctx.liveSocket = socket
    ctx.livePrev = null
    ctx.liveNext = this.head
    if (this.head) this.head.livePrev = ctx
    this.head = ctx
    this.size++
  }

  delete(ctx: CallContext): void {
    if (!ctx.liveSocket) return
    if (ctx.livePrev) ctx.livePrev.liveNext = ctx.liveNext
    else this.head = ctx.liveNext
    if (ctx.liveNext) ctx.liveNext.livePrev = ctx.livePrev
    ctx.liveSocket = ctx.livePrev = ctx.liveNext = null
    this.size--
  }

  /** Every live call with its socket; deleting the current call while iterating is safe. */
  *entries(): IterableIterator<[CallContext, Socket]> {
    let ctx = this.head
    while (ctx) {
      const next = ctx.liveNext
      yield [ctx, ctx.liveSocket!]
      ctx = next
    }
  }
}
