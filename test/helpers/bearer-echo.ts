// A gRPC endpoint that answers every call UNAUTHENTICATED with the caller's bearer token as its
// error text, in the spelling the test picks at the time: what a hostile or sloppy server does
// with the token a sidecar sent it (the collector's ingest, the broker's control stream).
import { Server, ServerCredentials, status, type Metadata, type ServiceDefinition, type UntypedServiceImplementation } from '@grpc/grpc-js'

/** Starts it on a free loopback port, `method` of `service` echoing, spelled by `spelling()` at each call. */
export async function startBearerEcho(service: ServiceDefinition, method: string, spelling: () => (secret: string) => string): Promise<{ port: number; close(): void }> {
  const server = new Server()
  const echo = (call: { metadata: Metadata; emit(event: 'error', err: { code: number; details: string }): boolean }) => {
    const auth = String(call.metadata.get('authorization')[0] ?? '')
    call.emit('error', { code: status.UNAUTHENTICATED, details: spelling()(auth.replace(/^Bearer /, '')) })
  }
  server.addService(service, { [method]: echo } as UntypedServiceImplementation)
  const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))))
  return { port, close: () => server.forceShutdown() }
}
