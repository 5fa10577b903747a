// A server address as an error or a log line may show it: its userinfo (`nats://user:password@`,
// `http://token@`) removed. NATS takes its credentials in the server URL, and a refused connect
// quoted the URL whole.

/** `address` (a URL or a bare host:port) without the `user:password@` of its authority. */
export function withoutUserinfo(address: string): string {
  // Up to the authority's last `@`, as URL parsers read it: a password may hold an `@` of its own.
  return address.replace(/^([A-Za-z][A-Za-z0-9+.-]*:\/\/)?[^/?#]*@/, (_, scheme: string | undefined) => `${scheme ?? ''}***@`)
}
