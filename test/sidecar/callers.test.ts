// The calling process, found through /proc for each connection: the audit names the executable
// (and its hash) that made each call, and a sidecar that lists allowed executables refuses the
// others. Real clients, each its own process: curl and python3.
import t from 'tap'
import { EnvHttpProxyAgent, fetch as undiciFetch } from 'undici'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { createHash } from 'node:crypto'
import { readFileSync, realpathSync } from 'node:fs'
import { startUpstream, startTestSidecar, loopbackPolicy } from '../helpers/harness.js'

const run = promisify(execFile)
const which = async (cmd: string) => realpathSync((await run('sh', ['-c', `command -v ${cmd}`])).stdout.trim())
/** The binary python3 really runs (a pyenv shim execs another one): what /proc will show. */
const pythonExe = async () => (await run('python3', ['-c', 'import os; print(os.readlink("/proc/self/exe"))'])).stdout.trim()
const sha = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex')
const py = 'import sys,urllib.request\ntry:\n  print(urllib.request.urlopen(sys.argv[1]).status)\nexcept urllib.error.HTTPError as e:\n  print(e.code)'
const env = () => {
  const e = { ...process.env }
  for (const k of ['HTTP_PROXY', 'http_proxy', 'NO_PROXY', 'no_proxy']) delete e[k]
  return e
}

t.test('the audit names the calling process', async (t) => {
  const up = await startUpstream()
  const s = await startTestSidecar({ ...loopbackPolicy([up.port]), sidecar: { callers: { identify: true } } })
  t.teardown(async () => {
    await s.close()
    await up.close()
  })
  const curl = await which('curl')
  await run('curl', ['-sS', '-x', s.proxy, `http://127.0.0.1:${up.port}/a`], { env: env() })
  await run('python3', ['-c', py, `http://127.0.0.1:${up.port}/b`], { env: { ...env(), HTTP_PROXY: s.proxy } })
  const audit = await s.audit()
  t.equal(audit.length, 2)
  t.match(audit[0], { path: '/a', caller: { exe: curl, sha256: sha(curl), uid: process.getuid!() } })
  t.ok((audit[0]!.caller as { pid: number }).pid > 0, 'with its pid')
  const python = await pythonExe()
  t.match(audit[1], { path: '/b', caller: { exe: python, sha256: sha(python) } })
})

t.test('only allowed executables may call', async (t) => {
  const up = await startUpstream()
  const python = await pythonExe()
  const s = await startTestSidecar({ ...loopbackPolicy([up.port]), sidecar: { callers: { allowed_executables: [sha(python)] } } })
  t.teardown(async () => {
    await s.close()
    await up.close()
  })
  const viaPython = await run('python3', ['-c', py, `http://127.0.0.1:${up.port}/ok`], { env: { ...env(), HTTP_PROXY: s.proxy } })
  t.equal(viaPython.stdout.trim(), '200', 'the agent (python) gets through')
  const viaCurl = await run('curl', ['-sS', '-i', '-x', s.proxy, `http://127.0.0.1:${up.port}/no`], { env: env() })
  t.match(viaCurl.stdout, /^HTTP\/1\.1 403 /)
  t.match(viaCurl.stdout, /"code":"LK_CALLER_DENIED"/)
  t.match(viaCurl.stdout, /curl is not an allowed caller/)
  t.same(up.requests.map((r) => r.url), ['/ok'], 'the refused caller reached nothing')
  const audit = await s.audit()
  t.match(audit[1], { status: 403, error: 'LK_CALLER_DENIED' })
  // The task API on the admin port is guarded the same way: curl may not open a task.
  const task = await run('curl', ['-sS', '-i', '-X', 'POST', '-H', 'content-type: application/json', '-d', '{"purpose":"x","duration_s":60}', `${s.sidecar.adminUrl}/v1/tasks`], { env: env() })
  t.match(task.stdout, /^HTTP\/1\.1 403 /)
  t.match(task.stdout, /caller_denied/)
  t.equal(s.sidecar.tasks.size, 0, 'no task was opened')
})

t.test('a uid allow-list that excludes the caller refuses it', async (t) => {
  const up = await startUpstream()
  const s = await startTestSidecar({ ...loopbackPolicy([up.port]), sidecar: { callers: { allowed_uids: [process.getuid!() + 4242] } } })
  t.teardown(async () => {
    await s.close()
    await up.close()
  })
  const res = await run('curl', ['-sS', '-i', '-x', s.proxy, `http://127.0.0.1:${up.port}/x`], { env: env() })
  t.match(res.stdout, /^HTTP\/1\.1 403 /)
  t.match(res.stdout, new RegExp(`uid ${process.getuid!()} may not use this sidecar`))
  // Node's fetch (this process, the same uid) tunnels an http:// URL to port 80: the CONNECT's
  // 403 was only "fetch failed" to it; the request inside reads why, and that retrying won't help.
  const dispatcher = new EnvHttpProxyAgent({ httpProxy: s.proxy, noProxy: '' })
  t.teardown(() => dispatcher.close())
  const port80 = await undiciFetch('http://api.example/x', { dispatcher }).then(
    async (r) => [r.status, r.headers.get('x-latchkey-error'), ((await r.json()) as { retryable: boolean }).retryable],
    (err: Error) => [`fetch threw: ${err.message}`],
  )
  t.same(port80, [403, 'LK_CALLER_DENIED', false], 'fetch on port 80 reads the refusal inside the tunnel')
  t.equal(up.requests.length, 0)
  t.match((await s.audit(2)).map((e) => [e.via, e.status, e.error]), [
    ['absolute', 403, 'LK_CALLER_DENIED'],
    ['tunnelled', 403, 'LK_CALLER_DENIED'],
  ], 'the request inside recorded as refused, the tunnel not a call of its own')
})

t.test('a connection an allowed executable also holds is not that executable\'s', async (t) => {
  // python3 connects, starts the allowed executable (sleep) with the connection inherited, and
  // writes its call from a process forked after it: sleep is then the lowest pid holding the
  // socket, the first /proc names. It lent python its name, and python's call went through.
  const up = await startUpstream()
  const sleep = await which('sleep')
  const s = await startTestSidecar({ ...loopbackPolicy([up.port]), sidecar: { callers: { allowed_executables: [sha(sleep)] } } })
  t.teardown(async () => {
    await s.close()
    await up.close()
  })
  const spoof = [
    'import os, socket, subprocess, sys',
    's = socket.create_connection(("127.0.0.1", int(sys.argv[1])))',
    'os.set_inheritable(s.fileno(), True)',
    'held = subprocess.Popen(["sleep", "30"], pass_fds=[s.fileno()])',
    'pid = os.fork()',
    'if pid == 0:',
    '    s.sendall(("GET " + sys.argv[2] + " HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n").encode())',
    '    data = b""',
    '    while True:',
    '        c = s.recv(65536)',
    '        if not c: break',
    '        data += c',
    '    print(data.decode().split("\\r\\n")[0])',
    '    os._exit(0)',
    's.close()',
    'os.waitpid(pid, 0)',
    'held.kill()',
  ].join('\n')
  const res = await run('python3', ['-c', spoof, new URL(s.proxy).port, `http://127.0.0.1:${up.port}/spoofed`], { env: env() })
  t.match(res.stdout, /^HTTP\/1\.1 403 /, 'refused: the connection is not only sleep\'s')
  t.same(up.requests, [], 'nothing reached the upstream')
  const audit = await s.audit()
  t.match(audit[0], { status: 403, error: 'LK_CALLER_DENIED', caller: { pid: null, exe: null, sha256: null } })
  // sleep alone, holding a connection another process made and then let go of, is still sleep.
  const alone = [
    'import os, socket, subprocess, sys, time',
    's = socket.create_connection(("127.0.0.1", int(sys.argv[1])))',
    'os.set_inheritable(s.fileno(), True)',
    'held = subprocess.Popen(["sleep", "30"], pass_fds=[s.fileno()])',
    's.sendall(("GET " + sys.argv[2] + " HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n").encode())',
    's.close()',
    'time.sleep(1.5)',
    'held.kill()',
  ].join('\n')
  await run('python3', ['-c', alone, new URL(s.proxy).port, `http://127.0.0.1:${up.port}/held`], { env: env() })
  const second = (await s.audit())[1]
  t.match(second, { path: '/held', caller: { exe: sleep, sha256: sha(sleep) } }, 'one holder, one executable: named')
})
