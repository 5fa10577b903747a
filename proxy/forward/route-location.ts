// A redirect from a reverse route's upstream, as the agent must follow it. The agent addresses
// the upstream as http://<sidecar>/<route>/…, so a Location on the upstream's own origin
// (`/login`, or `https://api.example.com/v2/x`) is put back under the route; any other Location
// (another origin, a relative path that already resolves under the route) is left as it is.
import type { Target } from '../context.js'
import { urlHostPort } from '../listen/target.js'

export function locationThroughRoute(location: string, target: Target): string {
  const route = target.route
  if (route === null) return location
  // Origin-relative. `//host` and `/\host` name another authority to most clients: left alone.
  if (location.startsWith('/')) return location[1] === '/' || location[1] === '\\' ? location : `/${route}${location}`
  let url: URL
  try {
    url = new URL(location)
  } catch {
    return location
  }
  if (url.protocol !== `${target.scheme}:` || url.username || url.password) return location
  const { host, port } = urlHostPort(url, target.scheme)
  if (host !== target.host || port !== target.port) return location
  return `/${route}${url.pathname}${url.search}${url.hash}`
}
