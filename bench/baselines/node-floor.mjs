// Reference, not a proxy: a node:http server answering by itself. What any Node process pays
// per request on this machine, so the proxies' figures can be read against Node's own floor.
import { createServer } from 'node:http'

createServer((_req, res) => res.end('ok')).listen(Number(process.argv[2]), '127.0.0.1', () => console.log('listening'))
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(0))
