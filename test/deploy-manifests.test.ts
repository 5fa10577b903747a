// deploy/kubernetes and deploy/compose.yaml, checked without a cluster or a Docker engine: every
// YAML document parses; every Kubernetes object validates against the Kubernetes OpenAPI schema
// (kubernetes-models' validators); every Latchkey config they embed passes the project's own
// check-config with the environment its container would have; and the wiring between them holds:
// the token the sidecar reads is the projected one, the probes reach the admin port, HTTP_PROXY
// names the listener, the URLs name the Services, the secrets each side needs are the same Secret.
// A manifest that rots fails here, not in a cluster.
import t, { type Test } from 'tap'
import { createRequire } from 'node:module'
import { runInNewContext } from 'node:vm'
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, posix } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { parse as parseYaml, parseAllDocuments } from 'yaml'
import { createLocalJWKSet, jwtVerify } from 'jose'
import { checkConfig } from '../cli/check-config.js'
import { parseConfig } from '../lib/config/load.js'
import { parseCollectorConfig } from '../collector/config.js'
import { parseRegistry } from '../broker/registry.js'
import { jwksFileProblem } from '../broker/jwt.js'
import { loadLocalAttestorKey, signLocalAttestation } from '../lib/local-attestor.js'
import type { Config } from '../lib/config/schema.js'
import type { CollectorConfig } from '../collector/config.js'

const K8S = 'deploy/kubernetes'
const tmp = mkdtempSync(join(tmpdir(), 'lk-deploy-'))

// ---- the Kubernetes objects' shapes, as far as this test reads them ----
interface EnvVar {
  name: string
  value?: string
  valueFrom?: { secretKeyRef?: { name: string; key: string }; fieldRef?: { fieldPath: string } }
}
interface Probe {
  httpGet?: { path: string; port: number | string; scheme?: string }
}
interface Container {
  name: string
  image: string
  command?: string[]
  args?: string[]
  env?: EnvVar[]
  ports?: { name?: string; containerPort: number }[]
  volumeMounts?: { name: string; mountPath: string; readOnly?: boolean; subPath?: string }[]
  restartPolicy?: string
  startupProbe?: Probe
  livenessProbe?: Probe
  readinessProbe?: Probe
  resources?: { requests?: Record<string, string>; limits?: Record<string, string> }
  securityContext?: { allowPrivilegeEscalation?: boolean; readOnlyRootFilesystem?: boolean; capabilities?: { drop?: string[] } }
}
interface Items {
  name: string
  items?: { key: string; path: string }[]
}
interface Volume {
  name: string
  configMap?: Items
  secret?: { secretName: string; items?: { key: string; path: string }[] }
  emptyDir?: object
  persistentVolumeClaim?: { claimName: string }
  projected?: { sources: { configMap?: Items; secret?: Items; serviceAccountToken?: { audience?: string; expirationSeconds?: number; path: string } }[] }
}
interface PodSpec {
  serviceAccountName?: string
  automountServiceAccountToken?: boolean
  securityContext?: { runAsNonRoot?: boolean; runAsUser?: number; seccompProfile?: { type: string } }
  terminationGracePeriodSeconds?: number
  initContainers?: Container[]
  containers: Container[]
  volumes?: Volume[]
}
interface K8sObject {
  apiVersion: string
  kind: string
  metadata: { name: string; namespace?: string; labels?: Record<string, string> }
  data?: Record<string, string>
  spec?: {
    replicas?: number
    serviceName?: string
    selector?: { matchLabels?: Record<string, string> } & Record<string, string>
    clusterIP?: string
    ports?: { name?: string; port: number; targetPort?: number | string }[]
    template?: { metadata: { labels?: Record<string, string> }; spec: PodSpec }
    volumeClaimTemplates?: { metadata: { name: string } }[]
    podSelector?: { matchLabels?: Record<string, string> }
    ingress?: { from?: { podSelector?: { matchLabels?: Record<string, string> } }[]; ports?: { port: number }[] }[]
  }
}
interface Kustomization {
  namespace: string
  resources: string[]
  images: { name: string; newName?: string; newTag?: string }[]
}

// ---- reading the files ----

/** Every YAML document of a file, parsed (errors fail the test: `t` is the caller's). */
function documents(t: Test, file: string, opts: { merge?: boolean } = {}): unknown[] {
  const text = readFileSync(file, 'utf8')
  return parseAllDocuments(text, { merge: opts.merge ?? false }).map((doc, i) => {
    t.same(
      doc.errors.map((e) => e.message),
      [],
      `${file}: document ${i + 1} parses`,
    )
    return doc.toJS() as unknown
  })
}

const kustomization = parseYaml(readFileSync(join(K8S, 'kustomization.yaml'), 'utf8')) as Kustomization
const dockerfile = readFileSync('Dockerfile', 'utf8')
const entrypoint = JSON.parse(/^ENTRYPOINT (\[.*\])$/m.exec(dockerfile)![1]!) as string[]
const cmd = JSON.parse(/^CMD (\[.*\])$/m.exec(dockerfile)![1]!) as string[]
const imageUser = /^USER (\S+)$/m.exec(dockerfile)![1]!
/** The CLI's subcommands that take `-c, --config <file>`, from its sources (cli/latchkey.ts, collector/cli.ts). */
const cliSource = readFileSync('cli/latchkey.ts', 'utf8') + readFileSync('collector/cli.ts', 'utf8')
const configCommands = new Set([...cliSource.matchAll(/\.command\('(\w+)'\)\s*\.description\([^\n]*\)\s*\.requiredOption\('-c, --config <file>'/g)].map((m) => m[1]!))

/** `64Mi`, `1Gi`, `256M` in bytes. */
function bytes(q: string): number {
  const m = /^(\d+)(Ki|Mi|Gi|K|M|G)?$/.exec(q)
  if (!m) throw new Error(`not a memory quantity: ${q}`)
  const unit = { Ki: 1024, Mi: 1024 ** 2, Gi: 1024 ** 3, K: 1e3, M: 1e6, G: 1e9 }[m[2] ?? ''] ?? 1
  return Number(m[1]) * unit
}

/** A value for an environment variable a Secret fills: shaped as the setting it overrides wants. */
function placeholderSecret(name: string): string {
  if (/URL$/.test(name)) return 'postgres://latchkey:placeholder@postgres.invalid:5432/latchkey'
  if (/SHA256/.test(name)) return 'ab'.repeat(32)
  return 'placeholder-secret-value-0123456789'
}

/**
 * A container's environment as Kubernetes would give it: literal values with $(VAR) references to
 * earlier variables expanded, fieldRef metadata.name as `podName`, each Secret's value a placeholder.
 */
function containerEnv(t: Test, c: Container, podName: string): Record<string, string> {
  const env: Record<string, string> = {}
  for (const v of c.env ?? []) {
    if (v.valueFrom?.secretKeyRef) env[v.name] = placeholderSecret(v.name)
    else if (v.valueFrom?.fieldRef) {
      t.equal(v.valueFrom.fieldRef.fieldPath, 'metadata.name', `${c.name}: ${v.name} is the pod's name`)
      env[v.name] = podName
    } else {
      env[v.name] = (v.value ?? '').replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (ref: string, name: string) => {
        t.ok(name in env, `${c.name}: ${v.name} refers to ${name}, defined before it`)
        return env[name] ?? ref
      })
    }
  }
  return env
}

/** What a file mounted into a container holds, and from where. */
interface Mounted {
  from: 'configMap' | 'secret' | 'token'
  name: string
  key: string
  audience?: string | undefined
  expirationSeconds?: number | undefined
}

/** The files a container's mounts give it (by absolute path), and the directories it may write. */
function mountsOf(c: Container, pod: PodSpec, claimTemplates: string[], configMaps: Map<string, Record<string, string>>): { files: Map<string, Mounted>; writable: string[]; unknown: string[] } {
  const files = new Map<string, Mounted>()
  const writable: string[] = []
  const unknown: string[] = []
  for (const m of c.volumeMounts ?? []) {
    const v = pod.volumes?.find((v) => v.name === m.name)
    if (!v) {
      if (claimTemplates.includes(m.name) && !m.readOnly) writable.push(m.mountPath)
      continue
    }
    if ((v.emptyDir || v.persistentVolumeClaim) && !m.readOnly) writable.push(m.mountPath)
    const add = (from: 'configMap' | 'secret', src: Items) => {
      const keys = src.items ?? (configMaps.has(src.name) && from === 'configMap' ? Object.keys(configMaps.get(src.name)!).map((key) => ({ key, path: key })) : null)
      if (!keys) unknown.push(`${m.mountPath} (${from} ${src.name}, every key)`)
      for (const { key, path } of keys ?? []) files.set(posix.join(m.mountPath, path), { from, name: src.name, key })
    }
    if (v.configMap) add('configMap', v.configMap)
    if (v.secret) add('secret', { name: v.secret.secretName, ...(v.secret.items ? { items: v.secret.items } : {}) })
    for (const s of v.projected?.sources ?? []) {
      if (s.configMap) add('configMap', s.configMap)
      if (s.secret) add('secret', s.secret)
      if (s.serviceAccountToken) {
        files.set(posix.join(m.mountPath, s.serviceAccountToken.path), { from: 'token', name: v.name, key: s.serviceAccountToken.path, audience: s.serviceAccountToken.audience, expirationSeconds: s.serviceAccountToken.expirationSeconds })
      }
    }
  }
  return { files, writable, unknown }
}

const under = (path: string, dir: string) => path === dir || path.startsWith(dir.endsWith('/') ? dir : dir + '/')

/** A probe's port, by number or by the container's port name. */
function probePort(c: Container, p: Probe | undefined): number | undefined {
  const port = p?.httpGet?.port
  return typeof port === 'number' ? port : c.ports?.find((q) => q.name === port)?.containerPort
}

/**
 * Runs check-config on `text` as the container would read it, and judges what it says: valid, every
 * file it could not read here one the container's mounts give it, every directory it could not
 * write one under a writable mount, and every LATCHKEY__ variable of the container a setting it took.
 */
async function checkEmbedded(t: Test, label: string, text: string, env: Record<string, string>, files: Map<string, unknown>, writable: string[]): Promise<void> {
  const file = join(tmp, `${label.replace(/[^A-Za-z0-9.-]+/g, '_')}.yaml`)
  writeFileSync(file, text)
  const r = await checkConfig(file, env)
  t.equal(r.code, 0, `${label}: check-config calls it valid`, { stderr: r.stderr })
  if (r.code !== 0) return
  const overrides = Object.keys(env).filter((k) => k.startsWith('LATCHKEY__'))
  for (const line of r.stderr.split('\n').filter(Boolean)) {
    const note = /^note: set by the environment, not the file: (.*)$/.exec(line)
    if (note) {
      for (const name of overrides) t.match(note[1]!, `${name} (`, `${label}: ${name} sets a setting`)
      continue
    }
    if (line.startsWith('note: ')) continue
    const warning = /^warning: [^ ]+: (\/[^:]*): (.*)$/.exec(line)
    t.ok(warning, `${label}: every warning names a file or directory the container has (${line})`)
    if (!warning) continue
    const [, path, what] = warning as unknown as [string, string, string]
    if (/^cannot read/.test(what)) t.ok(files.has(path), `${label}: ${path}, which it reads, is mounted`)
    else t.ok(writable.some((d) => under(path, d)), `${label}: ${path}, which it writes, is on a writable volume`)
  }
  if (overrides.length > 0) t.match(r.stderr, /^note: set by the environment/m, `${label}: its LATCHKEY__ variables are settings`)
}

/**
 * The fields of `value` that its Kubernetes type does not have, as paths. kubernetes-models'
 * validators follow the OpenAPI schema, which lets unknown fields through (the API server drops
 * them, and `kubectl apply` refuses them): a misspelt `readOnlyRootFileSystem` would pass them
 * and do nothing. The fields are read from the package's type declarations, generated from the
 * same OpenAPI document: one interface per file, one `"field"?: Type;` per line.
 */
function unknownFields(value: unknown, specifier: string, path: string, cache = new Map<string, DeclaredType | null>()): string[] {
  const type = declaredType(specifier, cache)
  if (!type || typeof value !== 'object' || value === null || Array.isArray(value)) return []
  const out: string[] = []
  for (const [key, v] of Object.entries(value)) {
    const field = type.fields.get(key)
    if (field === undefined) {
      out.push(`${path}.${key}`)
      continue
    }
    // Array<X>, X, or a map { [key: string]: X }: X checked where it is a declared type.
    const m = /^(?:Array<(\w+)>|(\w+)|\{ \[key: string\]: (\w+); \})$/.exec(field)
    const name = m?.[1] ?? m?.[2] ?? m?.[3]
    const next = name ? type.imports.get(name) : undefined
    if (!next) continue
    const items = m?.[1] ? (Array.isArray(v) ? v.map((x, i) => [`${path}.${key}[${i}]`, x] as const) : []) : m?.[3] ? Object.entries(v as object).map(([k, x]) => [`${path}.${key}.${k}`, x] as const) : [[`${path}.${key}`, v] as const]
    for (const [p, x] of items) out.push(...unknownFields(x, next, p, cache))
  }
  return out
}

interface DeclaredType {
  /** field → its type, as declared (an inline map flattened to one line). */
  fields: Map<string, string>
  /** imported type name → module specifier */
  imports: Map<string, string>
}

function declaredType(specifier: string, cache: Map<string, DeclaredType | null>): DeclaredType | null {
  if (cache.has(specifier)) return cache.get(specifier)!
  const file = fileURLToPath(import.meta.resolve(specifier)).replace(/\.js$/, '.d.ts')
  const text = readFileSync(file, 'utf8').replace(/\{\n +(\[key: string\]: \w+;)\n +\}/g, '{ $1 }')
  const body = /^export interface \w+(?: extends [\w, ]+)? \{\n([\s\S]*?)^\}/m.exec(text)?.[1]
  let type: DeclaredType | null = null
  if (body !== undefined) {
    const imports = new Map<string, string>()
    for (const m of text.matchAll(/^import \{ (\w+) \} from "([^"]+)";$/gm)) {
      imports.set(m[1]!, m[2]!.startsWith('.') ? pathToFileURL(join(dirname(file), m[2]!)).href : m[2]!)
    }
    // A field's type on its line; one declared inline over several lines (`Array<{`) is not looked into.
    type = { fields: new Map([...body.matchAll(/^ {4}"([^"]+)"\??: (.*?);?$/gm)].map((m) => [m[1]!, m[2]!])), imports }
  }
  cache.set(specifier, type)
  return type
}

// ---- Kubernetes ----

t.test('the Dockerfile runs the CLI, `sidecar --config <file>` by default', async (t) => {
  t.match(entrypoint.at(-1), /\/latchkey\.js$/, 'ENTRYPOINT is the latchkey CLI')
  t.same(cmd.slice(0, 2), ['sidecar', '--config'], 'CMD is <subcommand> --config <file>')
  t.same([...configCommands].sort(), ['broker', 'collector', 'sidecar'], 'the CLI takes --config for sidecar, broker and collector (this test reads its sources right)')
})

t.test('deploy/kubernetes', async (t) => {
  const files = readdirSync(K8S).filter((f) => f.endsWith('.yaml') && f !== 'kustomization.yaml')
  t.same([...kustomization.resources].sort(), files.sort(), 'kustomization.yaml lists every manifest, and only those')
  const objects: K8sObject[] = []
  for (const f of kustomization.resources) {
    for (const doc of documents(t, join(K8S, f))) if (doc !== null) objects.push(doc as K8sObject)
  }
  const ns = kustomization.namespace
  t.ok(objects.some((o) => o.kind === 'Namespace' && o.metadata.name === ns), `the namespace ${ns} is one of them`)

  await t.test('every object is valid against the Kubernetes schema', async (t) => {
    for (const o of objects) {
      const Model = (await import(`kubernetes-models/${o.apiVersion}/${o.kind}`).catch(() => ({}))) as Record<string, new (data: unknown) => { validate(): void }>
      const Ctor = Model[o.kind]
      t.ok(Ctor, `${o.kind} ${o.metadata.name}: ${o.apiVersion} ${o.kind} is a known kind`)
      if (!Ctor) continue
      let problem = ''
      try {
        new Ctor(o).validate()
      } catch (err) {
        problem = (err as Error).message
      }
      t.equal(problem, '', `${o.kind} ${o.metadata.name} validates`)
      t.same(unknownFields(o, `kubernetes-models/${o.apiVersion}/${o.kind}`, o.kind), [], `${o.kind} ${o.metadata.name}: no field its type does not have`)
      t.notOk(o.metadata.namespace, `${o.kind} ${o.metadata.name}: the namespace comes from kustomization.yaml alone`)
    }
  })

  const byKind = (kind: string) => objects.filter((o) => o.kind === kind)
  const one = (kind: string, name: string) => {
    const o = objects.find((o) => o.kind === kind && o.metadata.name === name)
    if (!o) throw new Error(`${kind} ${name} missing from deploy/kubernetes`)
    return o
  }
  const configMaps = new Map(byKind('ConfigMap').map((c) => [c.metadata.name, c.data ?? {}]))
  const workloads = objects.filter((o) => o.kind === 'Deployment' || o.kind === 'StatefulSet')

  t.test('no credential in a manifest', async (t) => {
    t.same(byKind('Secret'), [], 'no Secret object: they are made outside (deploy/README.md)')
    const readme = readFileSync('deploy/README.md', 'utf8')
    for (const f of kustomization.resources) t.notMatch(readFileSync(join(K8S, f), 'utf8'), /:\/\/[^/\s:@]+:[^/\s@]+@/, `${f}: no URL with a password`)
    for (const w of workloads) {
      const pod = w.spec!.template!.spec
      for (const c of [...(pod.initContainers ?? []), ...pod.containers]) {
        for (const v of c.env ?? []) {
          const ref = v.valueFrom?.secretKeyRef
          if (/TOKEN|PASSWORD|SECRET|STORE__.*URL/.test(v.name)) t.ok(ref, `${w.metadata.name}/${c.name}: ${v.name} comes from a Secret`)
          // Each Secret and key a pod needs is one deploy/README.md says how to make.
          if (ref) t.ok(readme.includes(ref.name) && readme.includes(ref.key), `${ref.name} (key ${ref.key}) is made in deploy/README.md`)
        }
        for (const v of pod.volumes ?? []) {
          for (const s of v.projected?.sources ?? []) {
            if (s.secret) t.ok(readme.includes(s.secret.name), `${s.secret.name} is made in deploy/README.md`)
            if (s.configMap && !configMaps.has(s.configMap.name)) t.ok(readme.includes(s.configMap.name), `${s.configMap.name} is made in deploy/README.md`)
          }
        }
      }
    }
  })

  t.test('workloads: selectors, volumes, Services, security, image', async (t) => {
    for (const w of workloads) {
      const name = `${w.kind} ${w.metadata.name}`
      const labels = w.spec!.template!.metadata.labels ?? {}
      for (const [k, v] of Object.entries(w.spec!.selector!.matchLabels ?? {})) t.equal(labels[k], v, `${name}: its selector matches its pods`)
      const pod = w.spec!.template!.spec
      const volumes = new Set([...(pod.volumes ?? []).map((v) => v.name), ...(w.spec!.volumeClaimTemplates ?? []).map((v) => v.metadata.name)])
      t.ok(pod.securityContext?.runAsNonRoot, `${name}: runAsNonRoot`)
      t.equal(pod.securityContext?.seccompProfile?.type, 'RuntimeDefault', `${name}: seccomp RuntimeDefault`)
      t.equal(pod.automountServiceAccountToken, false, `${name}: no API token mounted`)
      for (const c of [...(pod.initContainers ?? []), ...pod.containers]) {
        for (const m of c.volumeMounts ?? []) t.ok(volumes.has(m.name), `${name}/${c.name}: volume ${m.name} exists`)
        t.equal(c.securityContext?.allowPrivilegeEscalation, false, `${name}/${c.name}: allowPrivilegeEscalation false`)
        t.equal(c.securityContext?.readOnlyRootFilesystem, true, `${name}/${c.name}: read-only root filesystem`)
        t.same(c.securityContext?.capabilities?.drop, ['ALL'], `${name}/${c.name}: drops every capability`)
        t.ok(c.resources?.requests?.memory && c.resources.limits?.memory, `${name}/${c.name}: memory request and limit`)
        if (c.image.split(':')[0] === 'latchkey' || c.image.startsWith('latchkey@')) {
          t.ok(kustomization.images.some((i) => i.name === 'latchkey'), `${name}/${c.name}: kustomization.yaml's images sets its image`)
          t.equal(pod.securityContext?.runAsUser, 1000, `${name}: runs as the image's user ${imageUser} (1000)`)
        }
      }
      for (const v of pod.volumes ?? []) {
        for (const src of [v.configMap, ...(v.projected?.sources ?? []).map((s) => s.configMap)]) {
          const data = src ? configMaps.get(src.name) : undefined
          if (!src || !data) continue
          for (const item of src.items ?? []) t.ok(item.key in data, `${name}: ConfigMap ${src.name} has the key ${item.key}`)
        }
      }
      if (w.kind === 'StatefulSet') {
        const svc = one('Service', w.spec!.serviceName!)
        t.equal(svc.spec!.clusterIP, 'None', `${name}: its serviceName is a headless Service`)
      }
    }
    for (const s of byKind('Service')) {
      const target = workloads.find((w) => Object.entries(s.spec!.selector ?? {}).every(([k, v]) => w.spec!.template!.metadata.labels?.[k] === v))
      t.ok(target, `Service ${s.metadata.name}: its selector matches a workload's pods`)
    }
  })

  // The Service port that reaches `containerPort` on the pods of `workload`, through `service`.
  const servicePort = (service: string, workload: K8sObject, containerPort: number): number | undefined => {
    const pod = workload.spec!.template!.spec
    const ports = [...(pod.initContainers ?? []), ...pod.containers].flatMap((c) => c.ports ?? [])
    return one('Service', service).spec!.ports!.find((p) => {
      const target = p.targetPort ?? p.port
      return (typeof target === 'number' ? target : ports.find((q) => q.name === target)?.containerPort) === containerPort
    })?.port
  }
  const nameOfService = (host: string, service: string) => [service, `${service}.${ns}`, `${service}.${ns}.svc`, `${service}.${ns}.svc.cluster.local`].includes(host)

  /** The Latchkey container of a workload, its config (by the path its args name) and what it runs. */
  const latchkeyContainer = (t: Test, w: K8sObject, c: Container) => {
    const label = `${w.metadata.name}/${c.name}`
    t.notOk(c.command, `${label}: runs the image's ENTRYPOINT (${entrypoint.join(' ')})`)
    const args = c.args ?? cmd
    t.equal(args.length, 3, `${label}: args are <subcommand> --config <file>, as the Dockerfile's CMD`)
    t.equal(args[1], cmd[1], `${label}: ${cmd[1]} as the Dockerfile's CMD says it`)
    t.ok(configCommands.has(args[0]!), `${label}: \`latchkey ${args[0]}\` is a command that requires --config`)
    const pod = w.spec!.template!.spec
    const mounts = mountsOf(c, pod, (w.spec!.volumeClaimTemplates ?? []).map((v) => v.metadata.name), configMaps)
    t.same(mounts.unknown, [], `${label}: every mounted file is known by name`)
    const config = mounts.files.get(args[2]!)
    t.equal(config?.from, 'configMap', `${label}: its config ${args[2]} is mounted from a ConfigMap`)
    const text = config && configMaps.get(config.name)?.[config.key]
    t.ok(text, `${label}: that ConfigMap is in deploy/kubernetes and holds it`)
    return { subcommand: args[0]!, text: text ?? '', mounts, label }
  }

  const broker = one('Deployment', 'latchkey-broker')
  const brokerC = broker.spec!.template!.spec.containers.find((c) => c.name === 'broker')!
  const collector = one('Deployment', 'latchkey-collector')
  const collectorC = collector.spec!.template!.spec.containers.find((c) => c.name === 'collector')!
  const agent = one('StatefulSet', 'coder')
  const agentPod = agent.spec!.template!.spec

  let brokerConfig: NonNullable<Config['broker']> | undefined
  let collectorConfig: CollectorConfig['collector'] | undefined

  await t.test('the broker: its config and its registry pass check-config, wired to its pod', async (t) => {
    const { subcommand, text, mounts, label } = latchkeyContainer(t, broker, brokerC)
    t.equal(subcommand, 'broker', `${label}: latchkey broker`)
    const env = containerEnv(t, brokerC, 'latchkey-broker-5d8f7c9b4-x2x7q')
    await checkEmbedded(t, label, text, env, mounts.files, mounts.writable)
    const b = parseConfig(text, label, env).broker!
    brokerConfig = b
    t.equal(env.NODE_OPTIONS, '', `${label}: NODE_OPTIONS empty, V8's defaults (the Dockerfile's advice)`)
    t.ok(b.admin_token_env in env && brokerC.env!.find((v) => v.name === b.admin_token_env)?.valueFrom?.secretKeyRef, `${label}: ${b.admin_token_env} from a Secret`)
    t.ok(b.control && brokerC.env!.find((v) => v.name === b.control!.token_env)?.valueFrom?.secretKeyRef, `${label}: the control token from a Secret`)
    t.ok(mounts.writable.some((d) => under(b.keys.dir, d)), `${label}: broker.keys.dir ${b.keys.dir} is on a writable volume`)
    const keysVolume = broker.spec!.template!.spec.volumes!.find((v) => brokerC.volumeMounts!.some((m) => m.name === v.name && under(b.keys.dir, m.mountPath)))
    t.ok(keysVolume?.persistentVolumeClaim, `${label}: its signing keys outlive the pod (a PersistentVolumeClaim)`)
    t.equal(broker.spec!.replicas, 1, `${label}: one replica (each owns its keys, and the Service would mix their JWKS)`)
    // Probes reach the listener, over TLS when it has TLS.
    for (const [probe, path] of [['startupProbe', '/healthz'], ['livenessProbe', '/healthz'], ['readinessProbe', '/readyz']] as const) {
      const p = brokerC[probe]
      t.equal(p?.httpGet?.path, path, `${label}: ${probe} on ${path}`)
      t.equal(probePort(brokerC, p), b.listen.port, `${label}: ${probe} on broker.listen.port`)
      t.equal(p?.httpGet?.scheme ?? 'HTTP', b.listen.tls ? 'HTTPS' : 'HTTP', `${label}: ${probe} speaks the listener's scheme`)
    }
    // The registry it reads, from the same ConfigMap.
    const registryFile = mounts.files.get(b.registry_file)
    const registryText = registryFile && configMaps.get(registryFile.name)?.[registryFile.key]
    t.ok(registryText, `${label}: broker.registry_file is a ConfigMap of deploy/kubernetes`)
    await checkEmbedded(t, `${label} registry`, registryText ?? '', {}, mounts.files, mounts.writable)
  })

  await t.test('the collector: its config passes check-config, wired to its pod', async (t) => {
    const { subcommand, text, mounts, label } = latchkeyContainer(t, collector, collectorC)
    t.equal(subcommand, 'collector', `${label}: latchkey collector`)
    const env = containerEnv(t, collectorC, 'latchkey-collector-6c9d8f7b5-q4z8k')
    await checkEmbedded(t, label, text, env, mounts.files, mounts.writable)
    const c = parseCollectorConfig(text, label, env).collector
    collectorConfig = c
    t.equal(c.store.kind, 'postgres', `${label}: the PostgreSQL store`)
    t.ok(collectorC.env!.find((v) => v.name === 'LATCHKEY__COLLECTOR__STORE__URL')?.valueFrom?.secretKeyRef, `${label}: the store's URL from a Secret`)
    for (const [probe, path] of [['startupProbe', '/healthz'], ['livenessProbe', '/healthz'], ['readinessProbe', '/readyz']] as const) {
      t.equal(collectorC[probe]?.httpGet?.path, path, `${label}: ${probe} on ${path}`)
      t.equal(probePort(collectorC, collectorC[probe]), c.http?.port, `${label}: ${probe} on collector.http.port`)
    }
    t.equal(servicePort('latchkey-collector', collector, c.grpc.port), c.grpc.port, `${label}: the Service serves the gRPC ingest on its port`)
  })

  await t.test('the agent: Latchkey as its native sidecar', async (t) => {
    const sidecarC = agentPod.initContainers?.find((c) => c.image.startsWith('latchkey'))
    t.ok(sidecarC, 'the sidecar is an init container')
    if (!sidecarC) return
    t.equal(sidecarC.restartPolicy, 'Always', 'with restartPolicy Always: a native sidecar, started before the agent and outliving it')
    t.notOk(agentPod.containers.some((c) => c.image.startsWith('latchkey')), 'and not an ordinary container')
    const { subcommand, text, mounts, label } = latchkeyContainer(t, agent, sidecarC)
    t.equal(subcommand, 'sidecar', `${label}: latchkey sidecar`)
    const podName = `${agent.metadata.name}-0`
    const env = containerEnv(t, sidecarC, podName)
    await checkEmbedded(t, label, text, env, mounts.files, mounts.writable)
    const config = parseConfig(text, label, env)
    const sc = config.sidecar

    // Identity: the pod's name, under the agent type whose registry entry matches its service account.
    const registryFile = brokerConfig && configMaps.get('latchkey-broker')?.['agents.yaml']
    const registry = parseRegistry(registryFile ?? '', 'agents.yaml')
    const typed = Object.entries(registry.agents).find(([, a]) => a.match.kubernetes?.namespace === ns && a.match.kubernetes.service_account === agentPod.serviceAccountName)
    t.ok(typed, `the registry has an agent type for service account ${ns}/${agentPod.serviceAccountName}`)
    const [type, spec] = typed ?? ['', undefined]
    t.equal(sc.agent_id, `agent:${type}:${spec?.env}:${podName}`, `${label}: agent_id is the instance ID the broker gives the pod`)

    // The projected token: where the config reads it, for the broker, short-lived.
    const tokenFile = sc.attestation.kubernetes?.token_file
    const token = tokenFile ? mounts.files.get(tokenFile) : undefined
    t.equal(token?.from, 'token', `${label}: ${tokenFile} is the projected service-account token (mount path + path)`)
    t.equal(token?.audience, brokerConfig?.audience ?? brokerConfig?.issuer, `${label}: the token's audience is the broker's`)
    t.ok(token?.expirationSeconds && token.expirationSeconds >= 600 && token.expirationSeconds <= 3600, `${label}: the token lives 10 minutes to an hour (${token?.expirationSeconds} s)`)
    t.ok(token?.expirationSeconds && brokerConfig && token.expirationSeconds <= brokerConfig.attestors.kubernetes!.max_token_age_s, `${label}: younger than the broker's max_token_age_s`)
    for (const c of agentPod.containers) {
      for (const m of c.volumeMounts ?? []) t.notOk(sidecarC.volumeMounts!.some((s) => s.name === m.name), `${c.name}: mounts none of the sidecar's volumes (${m.name})`)
    }

    // The broker: the Service's name and port, TLS with the CA mounted.
    const brokerUrl = new URL(sc.broker!.url)
    t.ok(nameOfService(brokerUrl.hostname, 'latchkey-broker'), `${label}: sidecar.broker.url names the broker Service`)
    t.equal(servicePort('latchkey-broker', broker, brokerConfig!.listen.port), Number(brokerUrl.port), `${label}: on the Service port that reaches broker.listen.port`)
    t.equal(sc.broker!.url.replace(/\/$/, ''), brokerConfig!.audience ?? brokerConfig!.issuer, `${label}: the URL is the broker's issuer, the audience of its evidence`)
    t.equal(brokerUrl.protocol, brokerConfig!.listen.tls ? 'https:' : 'http:', `${label}: https:// as the broker listens with TLS`)
    const controlUrl = new URL(sc.control!.url.replace(/^grpc:/, 'http:'))
    t.ok(nameOfService(controlUrl.hostname, 'latchkey-broker'), `${label}: sidecar.control.url names the broker Service`)
    t.equal(servicePort('latchkey-broker', broker, brokerConfig!.control!.port), Number(controlUrl.port), `${label}: on the Service port that reaches broker.control.port`)
    t.equal(!!sc.control!.tls, !!brokerConfig!.control!.tls, `${label}: TLS on the control stream as the broker serves it`)
    const brokerCa = mounts.files.get(sc.control!.tls?.ca_file ?? '')
    t.equal(brokerCa && `${brokerCa.from} ${brokerCa.name}`, `secret ${broker.spec!.template!.spec.volumes!.flatMap((v) => v.projected?.sources ?? []).find((s) => s.secret)?.secret?.name}`, `${label}: the CA it checks the broker with is the broker's certificate's Secret`)
    // The control token: one Secret for both ends.
    const sidecarToken = sidecarC.env!.find((v) => v.name === `${config.secrets.env_prefix}${sc.control!.token_secret}`)?.valueFrom?.secretKeyRef
    const brokerToken = brokerC.env!.find((v) => v.name === brokerConfig!.control!.token_env)?.valueFrom?.secretKeyRef
    t.ok(sidecarToken, `${label}: ${config.secrets.env_prefix}${sc.control!.token_secret} from a Secret`)
    t.same(sidecarToken, brokerToken, `${label}: the control token is the broker's (one Secret, one key)`)
    // Tokens from the broker: audiences and scopes the registry gives this type.
    for (const cred of config.credentials.filter((c) => c.source === 'broker' || c.source === 'broker_secret')) {
      const scopes = spec?.audiences[cred.token_audience ?? cred.audience]
      t.ok(scopes, `${label}: credential ${cred.id}'s audience is in the registry for ${type}`)
      for (const s of cred.scopes ?? []) t.ok(scopes?.includes(s), `${label}: credential ${cred.id}'s scope ${s} is one ${type} may have`)
    }

    // The collector: its Service, and this pod's sidecar_id listed with the agent it reports.
    const ac = config.audit.collector!
    t.ok(ac, `${label}: audit streams to the collector`)
    const colon = ac.address.lastIndexOf(':')
    t.ok(nameOfService(ac.address.slice(0, colon), 'latchkey-collector'), `${label}: audit.collector.address names the collector Service`)
    t.equal(servicePort('latchkey-collector', collector, collectorConfig!.grpc.port), Number(ac.address.slice(colon + 1)), `${label}: on the Service port that reaches collector.grpc.port`)
    t.equal(!!ac.insecure_plaintext, !!collectorConfig!.grpc.insecure_plaintext, `${label}: plain text or TLS as the collector serves it`)
    t.ok(sidecarC.env!.find((v) => v.name === `${config.secrets.env_prefix}${ac.token_secret}`)?.valueFrom?.secretKeyRef, `${label}: its collector token from a Secret`)
    for (let i = 0; i < (agent.spec!.replicas ?? 1); i++) {
      const pod = `${agent.metadata.name}-${i}`
      const podEnv = containerEnv(t, sidecarC, pod)
      const id = parseConfig(text, label, podEnv).audit.collector!.sidecar_id
      const known = collectorConfig!.sidecars.find((s) => s.id === id)
      t.ok(known, `${label}: pod ${pod}'s sidecar_id ${id} is one the collector knows`)
      const agentId = `agent:${type}:${spec?.env}:${pod}`
      t.ok(known?.agents?.some((a) => (a.endsWith('*') ? agentId.startsWith(a.slice(0, -1)) : a === agentId)), `${label}: and may report ${agentId}`)
    }
    t.ok(mounts.writable.some((d) => under(ac.spool_dir, d)), `${label}: the spool ${ac.spool_dir} is on a writable volume`)
    const stateVolume = (agent.spec!.volumeClaimTemplates ?? []).find((v) => sidecarC.volumeMounts!.some((m) => m.name === v.metadata.name && under(ac.spool_dir, m.mountPath)))
    t.ok(stateVolume, `${label}: the spool is on the pod's own claim, which outlives the pod: its sequence goes on`)

    // Probes: the admin port, reachable by the kubelet (off loopback).
    for (const [probe, path] of [['startupProbe', '/healthz'], ['livenessProbe', '/healthz'], ['readinessProbe', '/readyz']] as const) {
      t.equal(sidecarC[probe]?.httpGet?.path, path, `${label}: ${probe} on ${path}`)
      t.equal(probePort(sidecarC, sidecarC[probe]), sc.admin.port, `${label}: ${probe} on sidecar.admin.port`)
    }
    t.ok(['0.0.0.0', '::'].includes(sc.admin.host), `${label}: the admin port listens where the kubelet's probes reach it`)
    t.ok(['127.0.0.1', '::1', 'localhost'].includes(sc.listen.host), `${label}: the proxy port stays on loopback`)

    // The agent: its proxy variables name the listener.
    const agentC = agentPod.containers[0]!
    const agentEnv = containerEnv(t, agentC, podName)
    const proxy = `http://${sc.listen.host}:${sc.listen.port}`
    for (const name of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy']) t.equal(agentEnv[name], proxy, `${agentC.name}: ${name} is the sidecar's listener`)
    for (const name of ['NO_PROXY', 'no_proxy']) t.ok(agentEnv[name]?.split(',').includes(sc.listen.host), `${agentC.name}: ${name} covers the sidecar itself`)

    // Shutdown: the agent first, then the sidecar's drain and its last acks, within the grace period.
    const grace = (agentPod.terminationGracePeriodSeconds ?? 30) * 1000
    t.ok(grace >= sc.timeouts.drain_ms + ac.close_timeout_ms + 10_000, `terminationGracePeriodSeconds (${grace / 1000} s) holds the agent's stop (10 s), drain_ms and close_timeout_ms`)

    // Sized from the bench: ~90 MB of RSS at 1,000 req/s.
    const mem = sidecarC.resources!
    t.ok(bytes(mem.requests!.memory!) >= 96 * 1024 ** 2, `${label}: requests at least 96 MiB (the bench's ~90 MB RSS)`)
    t.ok(bytes(mem.limits!.memory!) >= 1.5 * bytes(mem.requests!.memory!), `${label}: limit with headroom over the request`)
  })

  t.test('NetworkPolicies let the sidecars, and only them, reach the broker and the collector', async (t) => {
    const sidecarLabels = agent.spec!.template!.metadata.labels ?? {}
    const selects = (sel: Record<string, string> | undefined, labels: Record<string, string>) => Object.entries(sel ?? {}).every(([k, v]) => labels[k] === v)
    for (const [w, ports] of [
      [broker, [brokerConfig!.listen.port, brokerConfig!.control!.port]],
      [collector, [collectorConfig!.grpc.port]],
    ] as const) {
      const np = byKind('NetworkPolicy').find((p) => selects(p.spec!.podSelector!.matchLabels, w.spec!.template!.metadata.labels ?? {}))
      t.ok(np, `${w.metadata.name}: a NetworkPolicy selects its pods`)
      const rule = np?.spec!.ingress?.find((r) => r.from?.some((f) => selects(f.podSelector?.matchLabels, sidecarLabels)))
      t.ok(rule, `${w.metadata.name}: the agent's pods are let in`)
      t.same(rule?.ports?.map((p) => p.port).sort(), [...ports].sort(), `${w.metadata.name}: on the ports the sidecar uses`)
    }
  })
})

// ---- Docker Compose ----

interface ComposeService {
  image?: string
  entrypoint?: string[]
  command?: string[]
  environment?: Record<string, string>
  volumes?: string[]
  configs?: { source: string; target: string }[]
  network_mode?: string
  networks?: string[] | Record<string, { ipv4_address?: string } | null>
  stop_grace_period?: string
  healthcheck?: { test: string[] }
  read_only?: boolean
  user?: string
}
interface Compose {
  services: Record<string, ComposeService>
  configs: Record<string, { content: string }>
  networks: Record<string, { ipam?: { config?: { subnet: string }[] } }>
}

t.test('deploy/compose.yaml', async (t) => {
  const [doc] = documents(t, 'deploy/compose.yaml', { merge: true })
  const compose = doc as Compose
  const envScript = readFileSync('deploy/compose-env.sh', 'utf8')
  const composeText = readFileSync('deploy/compose.yaml', 'utf8')
  // Every ${VAR} the file reads, compose-env.sh writes; placeholders stand in for them here.
  const vars = new Set([...composeText.matchAll(/\$\{([A-Z_][A-Z0-9_]*)/g)].map((m) => m[1]!))
  for (const v of vars) t.match(envScript, new RegExp(`^echo "${v}=`, 'm'), `compose-env.sh writes ${v}`)
  const interpolate = (value: string) => value.replace(/\$\{([A-Z_][A-Z0-9_]*)(:\?[^}]*)?\}/g, (_, v: string) => placeholderSecret(v))
  t.notMatch(composeText, /:\/\/[^/\s:@$]+:[^/\s@$]+@/, 'no URL with a literal password')

  const svc = (name: string) => {
    const s = compose.services[name]
    if (!s) throw new Error(`service ${name} missing from deploy/compose.yaml`)
    return s
  }
  /** A Latchkey service: the image's ENTRYPOINT, `<subcommand> --config <file>`, the file from `configs`. */
  const latchkey = async (t: Test, name: string, subcommand: string) => {
    const s = svc(name)
    t.equal(s.image?.split(':')[0], 'latchkey', `${name}: the Latchkey image`)
    t.notOk(s.entrypoint, `${name}: runs the image's ENTRYPOINT`)
    t.same(s.command?.slice(0, 2), [subcommand, cmd[1]], `${name}: latchkey ${subcommand} ${cmd[1]} <file>`)
    t.ok(configCommands.has(subcommand), `${name}: \`latchkey ${subcommand}\` is a command that requires --config`)
    t.equal(s.read_only, true, `${name}: read-only root filesystem`)
    const target = s.command?.[2]
    const source = s.configs?.find((c) => c.target === target)?.source
    const text = (source && compose.configs[source]?.content) || ''
    t.ok(text, `${name}: its config ${target} is one of the file's configs`)
    const env: Record<string, string> = {}
    for (const [k, v] of Object.entries(s.environment ?? {})) env[k] = interpolate(v)
    for (const [k, v] of Object.entries(s.environment ?? {})) {
      if (/TOKEN|PASSWORD|SECRET|STORE__.*URL/.test(k)) t.match(v, /\$\{[A-Z0-9_]+:\?/, `${name}: ${k} comes from .env, required`)
    }
    // Files come from configs and volumes: named volumes are the keys service's and the state.
    const files = new Map<string, unknown>((s.configs ?? []).map((c) => [c.target, c]))
    const volumes = (s.volumes ?? []).map((v) => v.split(':')) as [string, string, string?][]
    const writable = volumes.filter(([, , mode]) => mode !== 'ro').map(([, path]) => path)
    const keysVolume = svc('latchkey-keys').volumes![0]!.split(':') as [string, string]
    const keysDir = svc('latchkey-keys').environment!.ATTESTOR_DIR!
    for (const [vol, path] of volumes) {
      if (vol !== keysVolume[0]) continue
      // The attestor's files, where this service mounts the volume the keys service wrote them to.
      for (const f of ['local-attestor.key.json', 'local-attestor.jwks.json']) files.set(posix.join(path, posix.relative(keysVolume[1], keysDir), f), 'attestor')
    }
    await checkEmbedded(t, name, text, env, files, writable)
    return { text, env, files, writable }
  }

  const brokerS = await latchkey(t, 'latchkey-broker', 'broker')
  const broker = parseConfig(brokerS.text, 'broker', brokerS.env).broker!
  const registry = compose.configs[svc('latchkey-broker').configs!.find((c) => c.target === broker.registry_file)?.source ?? '']?.content ?? ''
  await checkEmbedded(t, 'compose registry', registry, {}, new Map(), [])
  const collectorS = await latchkey(t, 'latchkey-collector', 'collector')
  const collector = parseCollectorConfig(collectorS.text, 'collector', collectorS.env).collector
  const sidecarS = await latchkey(t, 'latchkey-sidecar', 'sidecar')
  const config = parseConfig(sidecarS.text, 'sidecar', sidecarS.env)
  const sc = config.sidecar

  t.test('the wiring', async (t) => {
    t.equal(svc('latchkey-broker').environment!.NODE_OPTIONS, '', 'broker: V8 defaults')
    t.equal(svc('latchkey-collector').environment!.NODE_OPTIONS, '', 'collector: V8 defaults')
    t.ok(sc.attestation.local && sidecarS.files.has(sc.attestation.local.key_file), 'sidecar: the local attestor key is the keys service\'s')
    t.ok(broker.attestors.local && brokerS.files.has(broker.attestors.local.keys_file), "broker: trusts the keys service's key set")
    const brokerUrl = new URL(sc.broker!.url)
    t.equal(brokerUrl.hostname, 'latchkey-broker', 'sidecar.broker.url names the broker service')
    t.equal(Number(brokerUrl.port), broker.listen.port, 'on broker.listen.port')
    t.equal(sc.broker!.url.replace(/\/$/, ''), broker.audience ?? broker.issuer, "the URL is the broker's issuer, the audience of the local attestation")
    const control = new URL(sc.control!.url.replace(/^grpc:/, 'http:'))
    t.equal(control.hostname, 'latchkey-broker', 'sidecar.control.url names the broker service')
    t.equal(Number(control.port), broker.control!.port, 'on broker.control.port')
    t.equal(svc('latchkey-sidecar').environment![`${config.secrets.env_prefix}${sc.control!.token_secret}`], svc('latchkey-broker').environment![broker.control!.token_env], 'one control token for both ends')
    const ac = config.audit.collector!
    t.equal(ac.address, `latchkey-collector:${collector.grpc.port}`, 'audit.collector.address names the collector service and its gRPC port')
    const known = collector.sidecars.find((s) => s.id === ac.sidecar_id)
    t.ok(known?.agents?.includes(sc.agent_id), 'the collector knows this sidecar, reporting this agent')
    t.match(svc('latchkey-collector').environment!.LATCHKEY__COLLECTOR__SIDECARS__0__TOKEN_SHA256!, /LATCHKEY_SIDECAR_TOKEN_SHA256/, "the collector holds the hash of the sidecar's token")
    t.match(svc('latchkey-sidecar').environment![`${config.secrets.env_prefix}${ac.token_secret}`]!, /\{LATCHKEY_SIDECAR_TOKEN:/, 'the sidecar holds the token')
    t.match(envScript, /LATCHKEY_SIDECAR_TOKEN_SHA256=\$\(sha256 "\$sidecar"\)"/, 'compose-env.sh hashes that token')
    t.ok(sidecarS.writable.some((d) => under(ac.spool_dir, d)), 'the spool is on a volume')
    const reg = parseRegistry(registry, 'agents.yaml')
    const [, type, env] = sc.agent_id.split(':')
    t.ok(reg.agents[type!]?.match.local && reg.agents[type!]?.env === env, `the registry has ${type} in ${env}, attested locally`)
    for (const cred of config.credentials.filter((c) => c.source === 'broker')) {
      t.ok(reg.agents[type!]?.audiences[cred.token_audience ?? cred.audience], `credential ${cred.id}'s audience is in the registry`)
      const host = new URL(cred.audience).hostname
      const api = svc(host)
      const address = (api.networks as Record<string, { ipv4_address?: string }>).latchkey?.ipv4_address
      t.ok(address && config.network.allow.some((a) => a.cidr === `${address}/32`), `network.allow opens ${host}'s address (${address}), and only it`)
      const subnet = compose.networks.latchkey!.ipam!.config![0]!.subnet
      t.equal(address?.split('.').slice(0, 3).join('.'), subnet.split('.').slice(0, 3).join('.'), `${host}'s address is in the network's subnet`)
    }
    const agent = svc('demo-agent')
    t.equal(agent.network_mode, 'service:latchkey-sidecar', "the agent shares the sidecar's network, as a pod's containers do")
    for (const name of ['HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy']) t.equal(agent.environment![name], `http://${sc.listen.host}:${sc.listen.port}`, `demo-agent: ${name} is the sidecar's listener`)
    t.match(svc('latchkey-sidecar').healthcheck!.test.join(' '), `http://127.0.0.1:${sc.admin.port}/readyz`, "the sidecar's health is its /readyz")
    const grace = Number(/^(\d+)s$/.exec(svc('latchkey-sidecar').stop_grace_period ?? '')?.[1] ?? 10) * 1000
    t.ok(grace >= sc.timeouts.drain_ms + ac.close_timeout_ms, `stop_grace_period (${grace / 1000} s) holds drain_ms and close_timeout_ms`)
  })

  t.test("the keys service writes a key the sidecar signs with and the broker's key set verifies", async (t) => {
    const keys = svc('latchkey-keys')
    t.same(keys.entrypoint, ['node', '-e'], 'a node script')
    const dir = join(tmp, 'attestor')
    // Run here as `node -e` runs it (CommonJS require), with ATTESTOR_DIR as the service sets it: a process would cost a Node start.
    const run = () => runInNewContext(keys.command![0]!, { require: createRequire(import.meta.url), process: { env: { ATTESTOR_DIR: dir } }, console: { log: () => {} } })
    run()
    const key = await loadLocalAttestorKey(join(dir, 'local-attestor.key.json'))
    t.equal(jwksFileProblem(join(dir, 'local-attestor.jwks.json'), 'broker.attestors.local.keys_file'), null, "the key set is one the broker's check takes")
    const jwks = JSON.parse(readFileSync(join(dir, 'local-attestor.jwks.json'), 'utf8')) as Parameters<typeof createLocalJWKSet>[0]
    const audience = broker.audience ?? broker.issuer
    const { payload } = await jwtVerify(await signLocalAttestation(key, sc.agent_id, audience), createLocalJWKSet(jwks), { audience, issuer: 'latchkey-local' })
    t.equal(payload.sub, sc.agent_id, 'an attestation it signs verifies with the key set')
    // A second run keeps the key (a restart of the stack must not change what the broker trusts).
    run()
    t.equal((await loadLocalAttestorKey(join(dir, 'local-attestor.key.json'))).kid, key.kid, 'a second run keeps the key')
  })
})
