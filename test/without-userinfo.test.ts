// Server addresses as errors and logs show them: userinfo removed in every spelling.
import t from 'tap'
import { withoutUserinfo } from '../lib/without-userinfo.js'

t.test('userinfo is removed, whatever else the address holds', async (t) => {
  const cases: [string, string][] = [
    ['nats://user:secret@127.0.0.1:4222', 'nats://***@127.0.0.1:4222'],
    ['nats://token@nats.example:4222', 'nats://***@nats.example:4222'],
    ['tls://u:p%40ss@host', 'tls://***@host'],
    ['nats://u:p@ss@host:4222', 'nats://***@host:4222'],
    ['u:secret@127.0.0.1:4222', '***@127.0.0.1:4222'],
    ['http://a:b@host/path?x=y@z', 'http://***@host/path?x=y@z'],
    ['nats://127.0.0.1:4222', 'nats://127.0.0.1:4222'],
    ['127.0.0.1:4222', '127.0.0.1:4222'],
    ['http://host/path@x', 'http://host/path@x'],
  ]
  for (const [address, shown] of cases) t.equal(withoutUserinfo(address), shown, address)
})
