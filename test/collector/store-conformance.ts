// One conformance suite for every AuditStore. Each backend file (store-sqlite.test.ts,
// store-postgres.test.ts) supplies how to create a fresh backing store, open a second handle on
// it (a replica), run raw SQL as an attacker with database access would, and clean up.
import type { Test } from 'tap'
import { Action } from '../../protos/gen/latchkey/v1/audit.js'
import type { AuditStore } from '../../collector/store/types.js'
import { MAX_INVENTORY_HOSTS, StoreError } from '../../collector/store/types.js'
import { seqEvents, makeEvent } from './events.js'
import { randomUUID } from 'node:crypto'

export interface Backing {
  store: AuditStore
  /** A second handle on the same data (another collector replica). */
  replica(): AuditStore
  /** The same data opened as a reader does (`latchkey audit -c`): the backend's openReadOnly(). */
  readOnly(): Promise<AuditStore>
  /** Raw SQL; rejects with the database's error. */
  raw(sql: string): Promise<void>
  /** What an attacker with owner rights does first: switch off the append-only guards. */
  disableGuards(): Promise<void>
  cleanup(): Promise<void>
}

export interface Backend {
  name: string
  create(): Promise<Backing>
  /**
   * A fresh place where `ddl` ran before any store ({events} and {cursors} stand for the tables):
   * what an older version left. `open()` opens a store there as the collector does (the
   * constructor, then checkSchema()) and rejects as that does; `table(name)` is how the store names a table.
   */
  preexisting(ddl: string): Promise<{ open(): Promise<AuditStore>; openReadOnly(): Promise<AuditStore>; table(name: string): string; cleanup(): Promise<void> }>
  /** A place where no store is: a file, a schema that does not exist. */
  missing(): Promise<Place>
  /** A place that exists and holds no store: an empty database file, an empty schema. */
  empty(): Promise<Place>
}

/** A place a reader is pointed at (`latchkey audit -c` with a typo in it). */
export interface Place {
  /** The backend's openReadOnly() there. */
  openReadOnly(): Promise<AuditStore>
  /** What is there now: null for nothing at all (no file, no schema), else the tables it holds. */
  contents(): Promise<string[] | null>
  /** What the error must name (the setting, the path or the schema and where). */
  names: string[]
  cleanup(): Promise<void>
}

/** The events table as this version makes it (types PostgreSQL and SQLite both take), less what a test leaves out. */
const EVENT_COLUMNS = ['sidecar text NOT NULL', 'seq bigint NOT NULL', 'pos bigint NOT NULL', 'id text NOT NULL', 'ts bigint NOT NULL', 'agent text NOT NULL', 'agent_type text NOT NULL', 'host text NOT NULL', 'port integer NOT NULL', 'action smallint NOT NULL', 'audience text NOT NULL', 'received bigint NOT NULL', 'payload bytea NOT NULL', 'prev bytea NOT NULL', 'hash bytea NOT NULL']
function eventsTable(o: { without?: string[]; keys?: string[]; extra?: string[] } = {}): string {
  const cols = EVENT_COLUMNS.filter((c) => !o.without?.includes(c.split(' ')[0]!))
  return `CREATE TABLE {events} (${[...cols, ...(o.extra ?? []), ...(o.keys ?? ['PRIMARY KEY (sidecar, seq)', 'UNIQUE (sidecar, pos)'])].join(', ')})`
}

const A = 'sidecar-a'
const B = 'sidecar-b'

export function conformance(t: Test, backend: Backend): void {
  // CREATE TABLE IF NOT EXISTS keeps a table an older version made as it is: the store must refuse
  // one its appends would fail on at start-up, naming the table and what it lacks.
  const olderShapes: [string, string, (table: (n: string) => string) => string | null][] = [
    ['an events table without the audience column', eventsTable({ without: ['audience'] }), (tb) => `table ${tb('audit_events')} exists but is not the shape this version needs: no column audience.`],
    [
      'an events table without its primary key and UNIQUE (sidecar, pos)',
      eventsTable({ keys: [] }),
      (tb) => `table ${tb('audit_events')} exists but is not the shape this version needs: no primary key or unique constraint on (sidecar, seq); no primary key or unique constraint on (sidecar, pos).`,
    ],
    ['an events table keyed on (sidecar, seq) only', eventsTable({ without: ['agent_type'], keys: ['PRIMARY KEY (sidecar, seq)'] }), (tb) => `table ${tb('audit_events')} exists but is not the shape this version needs: no column agent_type; no primary key or unique constraint on (sidecar, pos).`],
    ['a cursors table without its key', `CREATE TABLE {cursors} (name text NOT NULL, sidecar text NOT NULL, pos bigint NOT NULL)`, (tb) => `table ${tb('audit_cursors')} exists but is not the shape this version needs: no primary key or unique constraint on (name, sidecar).`],
    // The shape the code needs, said another way, is taken.
    ['an events table with an extra column and its keys in another order', eventsTable({ extra: ['note text'], keys: ['PRIMARY KEY (seq, sidecar)', 'UNIQUE (pos, sidecar)'] }), () => null],
  ]
  for (const [what, ddl, expected] of olderShapes) {
    t.test(`${backend.name}: ${what} ${expected(String) ? 'is refused at start-up, naming it and what it lacks' : 'is taken'}`, async (t) => {
      const place = await backend.preexisting(ddl)
      t.teardown(() => place.cleanup())
      const want = expected(place.table)
      if (want === null) {
        const store = await place.open()
        t.teardown(() => store.close())
        t.equal((await store.append(A, seqEvents(1, 3))).stored, 3)
        t.equal((await store.append(A, seqEvents(2, 4))).stored, 1, 'dedupe holds')
        await store.saveCursors('fanout', new Map([[A, 2]]))
        await store.saveCursors('fanout', new Map([[A, 3]]))
        t.same(await store.cursors('fanout'), new Map([[A, 3]]))
        t.same(await store.verify(), { ok: true, checked: 4, sidecars: 1, breaks: [] })
        const reader = await place.openReadOnly()
        t.teardown(() => reader.close())
        t.same(await reader.verify(), { ok: true, checked: 4, sidecars: 1, breaks: [] }, 'and read, read-only')
        return
      }
      const readErr = await place.openReadOnly().then(
        async (s) => {
          await s.close()
          return null
        },
        (e: unknown) => e as Error & { code?: string },
      )
      t.equal(readErr?.message, `collector.store: ${want} Move it aside (or migrate it) and start again; nothing was changed.`, 'refused read-only too, naming it')
      const err = await place.open().then(
        async (s) => {
          await s.close()
          return null
        },
        (e: unknown) => e as Error & { code?: string },
      )
      t.ok(err, 'refused')
      t.equal(err?.message, `collector.store: ${want} Move it aside (or migrate it) and start again; nothing was changed.`)
      t.equal(err?.code, 'LK_STARTUP', 'a message for people, printed without a stack')
    })
  }

  // A reader pointed at a store that is not there (a typo, a volume not mounted) must say so, and
  // must not create one: an empty store made on the spot answered "0 calls", "chain verified".
  const refusal = async (t: Test, place: Place) => {
    const err = await place.openReadOnly().then(
      async (s) => {
        await s.close()
        return null
      },
      (e: unknown) => e as Error & { code?: string },
    )
    t.ok(err, 'refused')
    t.equal(err?.code, 'LK_STORE_MISSING')
    t.notMatch(err?.message ?? '', /\n/, 'one line')
    for (const n of place.names) t.ok(err?.message.includes(n), `the error names ${n}: ${err?.message}`)
    return err
  }
  t.test(`${backend.name}: a read-only open where no store is fails naming it, and creates nothing`, async (t) => {
    const place = await backend.missing()
    t.teardown(() => place.cleanup())
    await refusal(t, place)
    t.equal(await place.contents(), null, 'nothing was created')
    await refusal(t, place)
    t.equal(await place.contents(), null, 'nor the second time')
  })
  t.test(`${backend.name}: a read-only open of a place holding no store fails naming it, and creates no table`, async (t) => {
    const place = await backend.empty()
    t.teardown(() => place.cleanup())
    const err = await refusal(t, place)
    t.match(err?.message, /not a Latchkey audit store: no table audit_events, audit_cursors/)
    t.same(await place.contents(), [], 'no table was created')
  })

  const withStore = (name: string, fn: (t: Test, b: Backing) => Promise<void>) =>
    t.test(`${backend.name}: ${name}`, async (t) => {
      const b = await backend.create()
      t.teardown(() => b.cleanup())
      await fn(t, b)
    })

  withStore('append stores a batch, chains it, and dedupes by (sidecar, sequence)', async (t, { store }) => {
    const first = await store.append(A, seqEvents(1, 5))
    t.same({ stored: first.stored, duplicates: first.duplicates, highest: first.highest }, { stored: 5, duplicates: 0, highest: 5 })
    t.same(first.events.map((e) => e.position), [1, 2, 3, 4, 5])
    const again = await store.append(A, seqEvents(3, 7))
    t.same({ stored: again.stored, duplicates: again.duplicates, highest: again.highest }, { stored: 2, duplicates: 3, highest: 7 })
    t.same(again.events.map((e) => [e.sequence, e.position]), [[6, 6], [7, 7]])
    // Repeated inside one batch: stored once.
    const dup = seqEvents(8, 8)
    const inBatch = await store.append(A, [dup[0]!, dup[0]!])
    t.equal(inBatch.stored, 1)
    t.equal(inBatch.duplicates, 1)
    // The same sequence from another sidecar is a different event.
    t.equal((await store.append(B, seqEvents(1, 3, undefined, B))).stored, 3)
    const v = await store.verify()
    t.same(v, { ok: true, checked: 11, sidecars: 2, breaks: [] })
  })

  withStore('another event under a held sequence is refused whole, never acked as a duplicate', async (t, { store }) => {
    await store.append(A, seqEvents(1, 5))
    // A sidecar that lost its spool counts from 1 again: same sequences, new events.
    const reborn = seqEvents(4, 7).map((e) => ({ ...e, event: { ...e.event!, id: randomUUID() } }))
    await t.rejects(store.append(A, reborn), { code: 'LK_STORE_BAD_BATCH', message: /sequence 4 already holds another event/ })
    const all = await store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0) })
    t.same(all.map((e) => e.sequence), [1, 2, 3, 4, 5], 'nothing of the refused batch was stored, so the sidecar keeps all of it')
    t.same((await store.append(A, seqEvents(4, 6))).stored, 1, 'a true resend is still a duplicate')
    t.same(await store.verify(), { ok: true, checked: 6, sidecars: 1, breaks: [] })
  })

  withStore('two different events under one sequence in one batch are refused whole, as across batches', async (t, { store }) => {
    const [first] = seqEvents(5001, 5001)
    const second = { sequence: 5001, event: { ...first!.event!, id: 'second-B' } }
    first!.event!.id = 'first-A'
    await t.rejects(store.append(A, [first!, second]), { code: 'LK_STORE_BAD_BATCH', message: /sequence 5001 appears twice in the batch with different events \(first-A, second-B\)/ })
    t.equal((await store.verify()).checked, 0, 'nothing of the refused batch was stored')
    const same = await store.append(A, [first!, first!])
    t.same([same.stored, same.duplicates], [1, 1], 'the same event twice in a batch is still a duplicate')
  })

  withStore('an event ID already stored under another sequence or sidecar is refused: each call is recorded once', async (t, { store }) => {
    const [one] = seqEvents(1001, 1001)
    const again = (sequence: number) => ({ sequence, event: { ...one!.event!, id: one!.event!.id } })
    await t.rejects(store.append(A, [one!, again(1002)]), { code: 'LK_STORE_BAD_BATCH', message: `sidecar ${A}: sequence 1002: event id ${one!.event!.id} is already stored under sequence 1001 of this batch: an event is recorded once` })
    t.equal((await store.append(A, [one!])).stored, 1)
    await t.rejects(store.append(A, [again(1002)]), { code: 'LK_STORE_BAD_BATCH', message: `sidecar ${A}: sequence 1002: event id ${one!.event!.id} is already stored under sidecar ${A} sequence 1001: an event is recorded once` })
    await t.rejects(store.append(B, [again(1)]), { code: 'LK_STORE_BAD_BATCH', message: `sidecar ${B}: sequence 1: event id ${one!.event!.id} is already stored under sidecar ${A} sequence 1001: an event is recorded once` })
    // A resend of the stored event, with new events past it, is still taken.
    const r = await store.append(A, [one!, ...seqEvents(1002, 1003)])
    t.same([r.stored, r.duplicates], [2, 1])
    // Nor may a resend carry the same ID under a second, new sequence in its batch.
    await t.rejects(store.append(A, [one!, again(1004)]), { code: 'LK_STORE_BAD_BATCH', message: /sequence 1004: event id .* is already stored under sidecar sidecar-a sequence 1001/ })
    const all = await store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0) })
    t.same(all.map((e) => [e.sidecar, e.sequence]), [[A, 1001], [A, 1002], [A, 1003]], 'the call is listed once')
  })

  withStore('overlapping resends are stored once each, and the chain verifies', async (t, { store }) => {
    await store.append(A, seqEvents(1, 3))
    await store.append(A, seqEvents(2, 6))
    await store.append(A, seqEvents(1, 12))
    const all = await store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0) })
    t.same(all.map((e) => [e.sequence, e.position]), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12].map((n) => [n, n]))
    t.same(await store.verify(A), { ok: true, checked: 12, sidecars: 1, breaks: [] })
    t.same(await store.verify(''), { ok: true, checked: 0, sidecars: 0, breaks: [] }, 'a sidecar named "" is one no chain belongs to, not every sidecar')
  })

  withStore('an unseen sequence below the chain head is refused (no backdating into a gap); verify lists the gap', async (t, { store }) => {
    await store.append(A, seqEvents(1, 52))
    await store.append(A, seqEvents(551, 560))
    const backdated = seqEvents(300, 300, () => ({ ts: Date.now() - 20 * 3_600_000 }))
    await t.rejects(store.append(A, backdated), { code: 'LK_STORE_BAD_BATCH', message: `sidecar ${A}: sequence 300 was never stored but the chain already holds sequence 560: a sidecar sends in order, so an unseen sequence below its head is refused` })
    // Mixed with a true resend and new events past the head: still refused whole.
    await t.rejects(store.append(A, [...seqEvents(559, 560), ...backdated, ...seqEvents(561, 562)]), { code: 'LK_STORE_BAD_BATCH', message: /sequence 300 was never stored/ })
    // Out of order inside one batch: the later sequence first makes the earlier one a backfill.
    await t.rejects(store.append(A, [...seqEvents(570, 570), ...seqEvents(565, 565)]), { code: 'LK_STORE_BAD_BATCH', message: /sequence 565 was never stored but the chain already holds sequence 570/ })
    const r = await store.append(A, [...seqEvents(555, 560), ...seqEvents(561, 563)])
    t.same([r.stored, r.duplicates, r.highest], [3, 6, 563], 'a resend overlapping the head, and new events past it, are taken')
    t.same((await store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0) })).map((e) => e.sequence).filter((s) => s > 52 && s < 551), [], 'nothing stored in the gap')
    const v = await store.verify()
    t.same(v, { ok: true, checked: 65, sidecars: 1, breaks: [], gaps: [{ sidecar: A, position: 53, previous: 52, sequence: 551 }], gapCount: 1 }, 'the gap is reported, not a break')
  })

  withStore('a malformed batch is refused whole, naming the problem', async (t, { store }) => {
    const good = seqEvents(1, 2)
    await t.rejects(store.append(A, [...good, { sequence: 0, event: makeEvent() }]), { code: 'LK_STORE_BAD_BATCH', message: /sequence 0 is not a positive integer/ })
    const noAgent = makeEvent()
    noAgent.delegation = undefined
    await t.rejects(store.append(A, [...good, { sequence: 3, event: noAgent }]), { code: 'LK_STORE_BAD_BATCH', message: /sequence 3 has no delegation.agent/ })
    await t.rejects(store.append('', good), StoreError)
    t.equal((await store.verify()).checked, 0, 'nothing of the refused batches was stored')
  })

  withStore('a NUL in an indexed field or a time no Date can hold is refused as a bad batch, by both stores alike', async (t, { store }) => {
    // PostgreSQL text cannot hold U+0000: such a batch used to fail there as LK_STORE_UNAVAILABLE
    // (a sidecar retries that for ever) while SQLite stored it.
    for (const [field, opts] of [
      ['delegation.agent', { agent: 'agent:summarizer:test:a1\u0000x' }],
      ['call.host', { host: 'api.example.com\u0000.evil' }],
      ['credential.audience', { audience: 'https://api.example.com\u0000' }],
    ] as const) {
      await t.rejects(store.append(A, [...seqEvents(1, 1), ...seqEvents(2, 2, () => opts)]), { code: 'LK_STORE_BAD_BATCH', message: `sidecar ${A}: sequence 2: ${field} contains a NUL character` }, field)
    }
    const nulId = seqEvents(2, 2)
    nulId[0]!.event!.id = 'id\u0000'
    await t.rejects(store.append(A, nulId), { code: 'LK_STORE_BAD_BATCH', message: `sidecar ${A}: sequence 2: id contains a NUL character` })
    // 8.64e15 ms is the last instant a Date holds: past it, every reader prints "Invalid Date" or throws.
    await t.rejects(store.append(A, seqEvents(1, 1, () => ({ ts: 8.64e15 + 1 }))), { code: 'LK_STORE_BAD_BATCH', message: /sequence 1 has a time beyond year 275760 \(time_unix_ms 8640000000000001\)/ })
    t.equal((await store.verify()).checked, 0, 'nothing of the refused batches was stored')
    t.equal((await store.append(A, seqEvents(1, 1, () => ({ ts: 8.64e15 })))).stored, 1, 'the last representable instant is still a time')
  })

  withStore('a field past its size limit is refused naming the field; the limits leave room for real traffic', async (t, { store }) => {
    const huge = seqEvents(2, 2, () => ({ path: '/' + 'a'.repeat(7 * 1024 * 1024) }))
    await t.rejects(store.append(A, [...seqEvents(1, 1), ...huge]), { code: 'LK_STORE_BAD_BATCH', message: `sidecar ${A}: sequence 2: call.path is ${7 * 1024 * 1024 + 1} bytes, more than 65536` })
    const reason = seqEvents(1, 1)
    reason[0]!.event!.decision!.reason = 'é'.repeat(9000)
    await t.rejects(store.append(A, reason), { code: 'LK_STORE_BAD_BATCH', message: /sequence 1: decision.reason is 18000 bytes, more than 16384/ })
    await t.rejects(store.append(A, seqEvents(1, 1, () => ({ host: 'h'.repeat(5000) }))), { code: 'LK_STORE_BAD_BATCH', message: /sequence 1: call.host is 5000 bytes, more than 4096/ })
    const scopes = seqEvents(1, 1, () => ({ audience: 'aud' }))
    scopes[0]!.event!.credential!.scopes = Array.from({ length: 300 }, (_, i) => `s${i}`)
    await t.rejects(store.append(A, scopes), { code: 'LK_STORE_BAD_BATCH', message: /sequence 1: credential.scopes has 300 entries, more than 256/ })
    t.equal((await store.verify()).checked, 0, 'nothing of the refused batches was stored')
    // node:http bounds a request line by its header limit (16 KiB by default): such a path fits.
    t.equal((await store.append(A, seqEvents(1, 1, () => ({ path: '/' + 'p'.repeat(16 * 1024) })))).stored, 1)
  })

  withStore('events by agent are bounded in bytes as well as rows', async (t, { store }) => {
    const now = Date.now()
    await store.append(A, seqEvents(1, 10, (n) => ({ ts: now - 1000 + n, path: '/' + String(n % 10).repeat(60_000) })))
    const all = await store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0) })
    t.equal(all.length, 10)
    t.ok(all.every((e) => e.bytes! > 60_000 && e.bytes! < 61_000), 'each answer row says its stored size')
    const cut = await store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0), maxBytes: 200_000 })
    t.same(cut.map((e) => e.sequence), [1, 2, 3, 4], 'rows while the bytes before them are under the bound: the fourth reaches it')
    t.same((await store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0), maxBytes: 1 })).map((e) => e.sequence), [1], 'the first row always')
    t.same((await store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0), maxBytes: 200_000, limit: 2 })).map((e) => e.sequence), [1, 2])
  })

  withStore('inventory keeps an agent or sidecar name holding a comma whole', async (t, { store }) => {
    // A forged agent ID reading as two: SQLite's group_concat joined names with ',' and split them again.
    const forged = 'agent:x:y:a,agent:victim:prod:1'
    await store.append('sidecar,with-comma', seqEvents(1, 1, () => ({ agent: forged })))
    const inv = await store.inventory()
    t.same(inv.sidecars.map((s) => [s.sidecar, s.agents]), [['sidecar,with-comma', [forged]]])
    t.same(inv.agents.map((a) => [a.agent, a.sidecars]), [[forged, ['sidecar,with-comma']]])
  })

  withStore('updates and deletes are refused by the database itself', async (t, b) => {
    await b.store.append(A, seqEvents(1, 3))
    await t.rejects(b.raw(`UPDATE audit_events SET host = 'evil.example' WHERE seq = 2`), /append-only: UPDATE refused/)
    await t.rejects(b.raw(`DELETE FROM audit_events WHERE seq = 2`), /append-only: DELETE refused/)
    t.same((await b.store.verify()).checked, 3)
    const rows = await b.store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0) })
    t.same(rows.map((r) => r.event.call?.host), ['api.example.com', 'api.example.com', 'api.example.com'])
  })

  withStore('verify names the first break when a payload is altered behind the guards', async (t, b) => {
    await b.store.append(A, seqEvents(1, 5))
    await b.store.append(B, seqEvents(1, 5, undefined, B))
    await b.disableGuards()
    // Swap one event's payload for another's (a valid AuditEvent, wrong place in the chain).
    await b.raw(`UPDATE audit_events SET payload = (SELECT payload FROM audit_events WHERE sidecar = '${A}' AND seq = 1) WHERE sidecar = '${A}' AND seq = 3`)
    const v = await b.store.verify()
    t.equal(v.ok, false)
    t.equal(v.checked, 3 + 5, 'stops at the break in A, checks all of B')
    t.same(v.breaks, [{ sidecar: A, position: 3, sequence: 3, reason: 'hash does not match the stored payload (payload or hash altered)' }])
  })

  withStore('verify names a removed link and an altered indexed column', async (t, b) => {
    await b.store.append(A, seqEvents(1, 5))
    await b.store.append(B, seqEvents(1, 5, undefined, B))
    await b.disableGuards()
    await b.raw(`DELETE FROM audit_events WHERE sidecar = '${A}' AND seq = 2`)
    await b.raw(`UPDATE audit_events SET action = ${Action.ACTION_ALLOW + 5} WHERE sidecar = '${B}' AND seq = 4`)
    const v = await b.store.verify()
    t.same(v.breaks, [
      { sidecar: A, position: 3, sequence: 3, reason: 'position 3 follows 1: a link is missing' },
      { sidecar: B, position: 4, sequence: 4, reason: 'indexed column(s) action differ from the payload' },
    ])
    t.same((await b.store.verify(B)).breaks.length, 1)
  })

  withStore('verify re-derives every column a query or the inventory reads, not only ts, agent and action', async (t, b) => {
    const C = 'sidecar-c'
    const D = 'sidecar-d'
    for (const s of [A, B, C, D]) await b.store.append(s, seqEvents(1, 3, () => ({ audience: 'https://api.example.com' }), s))
    await b.disableGuards()
    await b.raw(`UPDATE audit_events SET host = 'other.example', port = 8443 WHERE sidecar = '${A}' AND seq = 2`)
    await b.raw(`UPDATE audit_events SET audience = 'https://evil.example' WHERE sidecar = '${B}' AND seq = 1`)
    await b.raw(`UPDATE audit_events SET id = 'forged' WHERE sidecar = '${C}' AND seq = 3`)
    await b.raw(`UPDATE audit_events SET agent_type = 'other' WHERE sidecar = '${D}' AND seq = 3`)
    const v = await b.store.verify()
    t.same(v.breaks, [
      { sidecar: A, position: 2, sequence: 2, reason: 'indexed column(s) host, port differ from the payload' },
      { sidecar: B, position: 1, sequence: 1, reason: 'indexed column(s) audience differ from the payload' },
      { sidecar: C, position: 3, sequence: 3, reason: 'indexed column(s) id differ from the payload' },
      { sidecar: D, position: 3, sequence: 3, reason: 'indexed column(s) agent_type differ from the payload' },
    ])
  })

  withStore('verify finds a removed tail or a removed chain against the cursors, the ingest\'s own and the fan-out\'s', async (t, b) => {
    await b.store.append(A, seqEvents(1, 5))
    await b.store.append(B, seqEvents(1, 5, undefined, B))
    await b.store.append('sidecar-c', seqEvents(1, 5, undefined, 'sidecar-c'))
    await b.store.append('sidecar-d', seqEvents(1, 5, undefined, 'sidecar-d'))
    await b.store.saveCursors('nats', new Map([['sidecar-d', 4]]))
    t.same((await b.store.cursors('ingest')).get(A), 5, 'each append records the head it reached')
    await b.disableGuards()
    await b.raw(`DELETE FROM audit_events WHERE sidecar = '${A}' AND seq >= 4`)
    await b.raw(`DELETE FROM audit_events WHERE sidecar = 'sidecar-c'`)
    // An attacker who also lowers the ingest cursor is still caught by the fan-out's.
    await b.raw(`DELETE FROM audit_events WHERE sidecar = 'sidecar-d' AND seq = 5`)
    await b.raw(`DELETE FROM audit_events WHERE sidecar = 'sidecar-d' AND seq = 4`)
    await b.raw(`UPDATE audit_cursors SET pos = 3 WHERE name = 'ingest' AND sidecar = 'sidecar-d'`)
    const v = await b.store.verify()
    t.equal(v.ok, false)
    t.same(v.breaks, [
      { sidecar: A, position: 4, sequence: 0, reason: 'the chain ends at position 3, but the collector stored up to position 5: links were removed from its tail' },
      { sidecar: 'sidecar-c', position: 1, sequence: 0, reason: 'no link is stored, but the collector stored up to position 5: the whole chain was removed' },
      { sidecar: 'sidecar-d', position: 4, sequence: 0, reason: 'the chain ends at position 3, but consumer "nats" already handled position 4: links were removed from its tail' },
    ])
    t.same((await b.store.verify('sidecar-c')).breaks.length, 1, 'asked about the removed chain alone')
    t.same((await b.store.verify(B)).ok, true)
  })

  withStore('events by agent since a time, optionally denied only', async (t, { store }) => {
    const now = Date.now()
    const hour = 3_600_000
    await store.append(A, [
      { sequence: 1, event: makeEvent({ agent: 'agent:x:prod:1', ts: now - 30 * hour }) },
      { sequence: 2, event: makeEvent({ agent: 'agent:x:prod:1', ts: now - 2 * hour, path: '/a' }) },
      { sequence: 3, event: makeEvent({ agent: 'agent:x:prod:1', ts: now - hour, path: '/admin', action: Action.ACTION_DENY, status: 403 }) },
      { sequence: 4, event: makeEvent({ agent: 'agent:y:prod:1', ts: now - hour }) },
      { sequence: 5, event: makeEvent({ agent: 'agent:x:prod:1', ts: now - hour / 2, path: '/report', action: Action.ACTION_REPORT }) },
    ])
    const since = new Date(now - 24 * hour)
    const day = await store.eventsByAgent({ agent: 'agent:x:prod:1', since })
    t.same(day.map((e) => e.event.call?.path), ['/a', '/admin', '/report'])
    t.ok(day.every((e) => e.event.delegation?.agent === 'agent:x:prod:1'))
    const denied = await store.eventsByAgent({ agent: 'agent:x:prod:1', since, deniedOnly: true })
    t.same(denied.map((e) => [e.event.call?.path, e.event.decision?.action]), [['/admin', Action.ACTION_DENY], ['/report', Action.ACTION_REPORT]])
    t.same((await store.eventsByAgent({ agent: 'agent:x:prod:1', since: new Date(0), until: new Date(now - 3 * hour) })).length, 1)
    t.same(await store.eventsByAgent({ agent: 'agent:nobody:prod:1', since: new Date(0) }), [])
    t.equal((await store.eventsByAgent({ agent: 'agent:x:prod:1', since: new Date(0), limit: 2 })).length, 2)
  })

  withStore('events by agent page after a cursor: every event exactly once, in order, ties in time included', async (t, { store }) => {
    // Two sidecars, several events at one instant in each, pages of 3 cutting through the ties.
    const now = Date.now()
    const X = 'agent:x:prod:1'
    const times = [now - 5000, now - 4000, now - 4000, now - 4000, now - 3000, now - 3000, now - 2000]
    await store.append(A, seqEvents(1, times.length, (s) => ({ agent: X, ts: times[s - 1] })))
    await store.append(B, seqEvents(1, times.length, (s) => ({ agent: X, ts: times[s - 1] }), B))
    await store.append(A, seqEvents(times.length + 1, times.length + 1, () => ({ agent: 'agent:y:prod:1', ts: now - 4000 })))
    const since = new Date(now - 60_000)
    const whole = await store.eventsByAgent({ agent: X, since })
    t.equal(whole.length, 14)
    const key = (e: { sidecar: string; position: number }) => `${e.sidecar}#${e.position}`
    /** Every page of 3, each asked after the last event of the one before. */
    const pagedThrough = async (newest: boolean) => {
      const keys: string[] = []
      let after: { ts: number; sidecar: string; position: number } | undefined
      for (let pages = 0; pages < 20; pages++) {
        const page = await store.eventsByAgent({ agent: X, since, limit: 3, after, newest })
        keys.push(...page.map(key))
        if (page.length < 3) break
        const last = page[page.length - 1]!
        after = { ts: last.event.timeUnixMs, sidecar: last.sidecar, position: last.position }
      }
      return keys
    }
    t.same(await pagedThrough(false), whole.map(key), 'the pages together are the whole answer, in its order, each event once')
    t.same(
      (await store.eventsByAgent({ agent: X, since, after: { ts: now - 3000, sidecar: A, position: 5 } })).map(key),
      [`${A}#6`, `${B}#5`, `${B}#6`, `${A}#7`, `${B}#7`],
      'after (time, sidecar, position): later times, then the same time in a later sidecar or position',
    )
    t.same(await store.eventsByAgent({ agent: X, since, after: { ts: now - 2000, sidecar: B, position: 7 } }), [], 'after the last event: nothing')

    // Newest first: the same events reversed, paged the same way through the ties, each once.
    const newest = await store.eventsByAgent({ agent: X, since, newest: true })
    t.same(newest.map(key), whole.map(key).reverse(), 'newest first is the whole answer reversed')
    t.same(await pagedThrough(true), newest.map(key), 'its pages together are the whole answer, each event once')
    t.same(
      (await store.eventsByAgent({ agent: X, since, after: { ts: now - 3000, sidecar: B, position: 5 }, newest: true })).map(key),
      [`${A}#6`, `${A}#5`, `${B}#4`, `${B}#3`, `${B}#2`, `${A}#4`, `${A}#3`, `${A}#2`, `${B}#1`, `${A}#1`],
      'newest first, after (time, sidecar, position): the same time in an earlier sidecar or position, then earlier times',
    )
    t.same((await store.eventsByAgent({ agent: X, since: new Date(now - 4500), newest: true, limit: 2 })).map(key), [`${B}#7`, `${A}#7`], 'the limit keeps the newest')
  })

  withStore('inventory: agents, sidecars, last seen, hosts and audiences actually used', async (t, { store }) => {
    const now = Date.now()
    await store.append(A, [
      { sequence: 1, event: makeEvent({ agent: 'agent:x:prod:1', ts: now - 5000, host: 'api.github.com', audience: 'https://api.github.com' }) },
      { sequence: 2, event: makeEvent({ agent: 'agent:x:prod:1', ts: now - 4000, host: 'evil.example', port: 80, action: Action.ACTION_DENY, status: 403 }) },
      { sequence: 3, event: makeEvent({ agent: 'agent:x:prod:1', ts: now - 3000, host: 'uploads.github.com' }) },
    ])
    await store.append(B, [
      { sequence: 1, event: makeEvent({ agent: 'agent:x:prod:1', ts: now - 1000, host: 'api.github.com', audience: 'https://api.github.com' }) },
      { sequence: 2, event: makeEvent({ agent: 'agent:y:dev:9', ts: now - 2000, host: 'slack.com', audience: 'slack' }) },
    ])
    const inv = await store.inventory()
    t.same(inv.agents.map((a) => ({ ...a, firstSeen: a.firstSeen.getTime(), lastSeen: a.lastSeen.getTime() })), [
      {
        agent: 'agent:x:prod:1',
        sidecars: [A, B],
        firstSeen: now - 5000,
        lastSeen: now - 1000,
        calls: 4,
        denied: 1,
        hosts: ['api.github.com:443', 'uploads.github.com:443'],
        hostCount: 2,
        audiences: ['https://api.github.com'],
      },
      { agent: 'agent:y:dev:9', sidecars: [B], firstSeen: now - 2000, lastSeen: now - 2000, calls: 1, denied: 0, hosts: ['slack.com:443'], hostCount: 1, audiences: ['slack'] },
    ])
    t.same(inv.sidecars.map((s) => ({ sidecar: s.sidecar, agents: s.agents, events: s.events, lastSequence: s.lastSequence })), [
      { sidecar: A, agents: ['agent:x:prod:1'], events: 3, lastSequence: 3 },
      { sidecar: B, agents: ['agent:x:prod:1', 'agent:y:dev:9'], events: 2, lastSequence: 2 },
    ])
    for (const s of inv.sidecars) t.ok(Math.abs(s.lastSeen.getTime() - Date.now()) < 60_000, `${s.sidecar} last seen is the receive time`)
  })

  withStore('inventory lists an agent\'s first MAX_INVENTORY_HOSTS host:port pairs, bytewise, and counts them all', async (t, { store }) => {
    const now = Date.now()
    // Spellings whose order differs between a byte order and a locale's (punctuation, case, digits).
    const odd = ['a-b.test', 'a.test', 'a_b.test', 'ab.test', 'A.test', '0.test', 'a.test.b']
    const many = [...odd, ...Array.from({ length: MAX_INVENTORY_HOSTS + 43 - odd.length }, (_, i) => `h${String(i).padStart(3, '0')}.wild.example`)]
    await store.append(A, [
      ...many.map((host, i) => ({ sequence: i + 1, event: makeEvent({ agent: 'agent:busy:prod:1', ts: now - 10_000 + i, host }) })),
      // Called twice: one pair. Denied: not called.
      { sequence: many.length + 1, event: makeEvent({ agent: 'agent:busy:prod:1', ts: now - 100, host: 'a.test' }) },
      { sequence: many.length + 2, event: makeEvent({ agent: 'agent:busy:prod:1', ts: now - 99, host: 'denied.test', action: Action.ACTION_DENY, status: 403 }) },
      { sequence: many.length + 3, event: makeEvent({ agent: 'agent:quiet:prod:1', ts: now - 98, host: 'one.test' }) },
    ])
    const inv = await store.inventory()
    const busy = inv.agents.find((a) => a.agent === 'agent:busy:prod:1')!
    const sorted = many.map((h) => `${h}:443`).sort()
    t.equal(busy.hostCount, MAX_INVENTORY_HOSTS + 43, 'every distinct pair counted, the denied one not')
    t.same(busy.hosts, sorted.slice(0, MAX_INVENTORY_HOSTS), 'the first ones in byte order, as both stores sort')
    t.equal(busy.calls, many.length + 2)
    const quiet = inv.agents.find((a) => a.agent === 'agent:quiet:prod:1')!
    t.same([quiet.hosts, quiet.hostCount], [['one.test:443'], 1], 'another agent lists its own, uncut')
  })

  withStore('the credential is kept as audience, scopes, jti and token hash only', async (t, { store }) => {
    await store.append(A, [{ sequence: 1, event: makeEvent({ audience: 'https://api.github.com' }) }])
    const [e] = await store.eventsByAgent({ agent: 'agent:summarizer:test:a1', since: new Date(0) })
    t.same(Object.keys(e!.event.credential!).sort(), ['audience', 'jti', 'provider', 'scopes', 'tokenSha256'])
    t.equal(Buffer.from(e!.event.credential!.tokenSha256).length, 32)
  })

  withStore('after, heads and cursors: what a consumer needs to catch up', async (t, { store }) => {
    await store.append(A, seqEvents(1, 7))
    await store.append(B, seqEvents(1, 2, undefined, B))
    t.same([...(await store.heads())].sort(), [[A, 7], [B, 2]])
    const page = await store.after(A, 3, 2)
    t.same(page.map((e) => [e.sidecar, e.position, e.sequence]), [[A, 4, 4], [A, 5, 5]])
    t.same((await store.after(A, 7, 10)).length, 0)
    t.same(await store.cursors('nats'), new Map())
    await store.saveCursors('nats', new Map([[A, 5], [B, 2]]))
    await store.saveCursors('nats', new Map([[A, 3]])) // never backwards
    await store.saveCursors('other', new Map([[A, 1]]))
    t.same([...(await store.cursors('nats'))].sort(), [[A, 5], [B, 2]])
    t.same([...(await store.cursors('other'))], [[A, 1]])
  })

  withStore('a read-only open reads what the collector wrote, while it writes, and writes nothing', async (t, b) => {
    await b.store.append(A, seqEvents(1, 5))
    await b.store.saveCursors('nats', new Map([[A, 4]]))
    const reader = await b.readOnly()
    t.teardown(() => reader.close())
    const agent = { agent: 'agent:summarizer:test:a1', since: new Date(0) }
    t.same((await reader.eventsByAgent(agent)).map((e) => [e.sequence, e.hash]), (await b.store.eventsByAgent(agent)).map((e) => [e.sequence, e.hash]))
    t.same(await reader.verify(), { ok: true, checked: 5, sidecars: 1, breaks: [] })
    t.same(await reader.inventory(), await b.store.inventory())
    t.same(await reader.heads(), new Map([[A, 5]]))
    t.same(await reader.cursors('nats'), new Map([[A, 4]]))
    await reader.ping()
    await t.rejects(reader.append(A, seqEvents(6, 6)), { code: 'LK_STORE_UNAVAILABLE', message: /open read-only: append refused/ })
    await t.rejects(reader.saveCursors('nats', new Map([[A, 5]])), { code: 'LK_STORE_UNAVAILABLE', message: /open read-only: saveCursors refused/ })
    t.same(await b.store.cursors('nats'), new Map([[A, 4]]), 'nothing was written')
    // The collector goes on appending; the reader sees it.
    await b.store.append(A, seqEvents(6, 8))
    t.same(await reader.verify(), { ok: true, checked: 8, sidecars: 1, breaks: [] })
    t.same((await reader.eventsByAgent(agent)).length, 8)
  })

  withStore('two replicas appending to one sidecar concurrently keep one linear chain', async (t, b) => {
    const r2 = b.replica()
    t.teardown(() => r2.close())
    // Two streams of one sidecar (a reconnect landing on the other replica while the first still
    // drains), each sending every batch in order: each event stored once, never twice.
    const stream = async (s: AuditStore, offset: number) => {
      for (let i = 0; i < 20; i++) await s.append(A, seqEvents(i * 10 + 1, i * 10 + 10 + (i + offset) % 3))
    }
    await Promise.all([stream(b.store, 0), stream(r2, 1)])
    const v = await b.store.verify()
    t.same(v, { ok: true, checked: 202, sidecars: 1, breaks: [] }, "sequences 1 to 202, once each")
  })
}
