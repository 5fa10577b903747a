// An upstream's Location, as the agent will follow it. A client resolves a Location against the
// URL it asked for, and the agent asked the sidecar, so the sidecar resolves it the same way
// first: against the upstream URL the call went to. Then
//  - one that would bring the agent back to the sidecar itself is not relayed (see Pipeline.relocate);
//  - on a reverse route, one on the upstream's own origin, inside the route's base path, is put
//    back under `/<route>`, with its dot segments already resolved: `/../billing/x` from route
//    `search` is `/search/billing/x`, never another route and its credential;
//  - any other is left as the upstream wrote it.
import type { Target } from '../context.js'
import { hostHeader, routeBase, urlHostPort } from '../listen/target.js'

/**
 * Headers besides Location and Link whose one URL a client follows by itself: Content-Location,
 * and a long-running operation's status URL, which the Azure SDKs' pollers call
 * (`Operation-Location`, `Azure-AsyncOperation`). Relocated as a Location is (ResponseRelay), and
 * looked through as URLs by the scrub.
 */
export const FOLLOWED_URLS = ['content-location', 'operation-location', 'azure-asyncoperation'] as const

/** The URL a client following `location` would ask for, or null when it is no URL at all. */
export function resolveLocation(location: string, target: Target): URL | null {
  try {
    return new URL(location, `${target.scheme}://${hostHeader(target)}${target.path}`)
  } catch {
    return null
  }
}

/**
 * `routeUpstream`: the route's upstream URL (its path is the base every call on the route is
 * under). A Location on the upstream's origin but outside that base cannot be reached through
 * the route: it is given as the upstream's own absolute URL.
 */
export function locationThroughRoute(location: string, resolved: URL | null, target: Target, routeUpstream: URL): string {
  if (target.route === null || resolved === null) return location
  if (resolved.protocol !== `${target.scheme}:` || resolved.username || resolved.password) return location
  const { host, port } = urlHostPort(resolved, target.scheme)
  if (host !== target.host || port !== target.port) return location
  const under = pathUnderRoute(resolved.pathname, target.route, routeBase(routeUpstream))
  return under === null ? resolved.href : `${under}${resolved.search}${resolved.hash}`
}

/**
 * An upstream path as the route's own URL path: inside the route's base path (`base`, routeBase;
 * `''` for none), put under `/<route>`; null outside it, where no call through the route reaches.
 * What Location and Set-Cookie paths are translated by (route-cookie.ts).
 */
export function pathUnderRoute(path: string, route: string, base: string): string | null {
  if (base !== '' && path !== base && !path.startsWith(`${base}/`)) return null
  return `/${route}${path.slice(base.length) || '/'}`
}
