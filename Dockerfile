# The one Latchkey image: `latchkey sidecar|broker|collector|up|check-config`.
# Build stage compiles TypeScript and native addons; the runtime stage carries only what runs.
FROM node:24-bookworm-slim AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY lib ./lib
COPY proxy ./proxy
COPY cli ./cli
COPY broker ./broker
COPY collector ./collector
COPY protos ./protos
COPY deploy ./deploy
COPY scripts ./scripts
# The runtime's files, laid out in /app: the bundled CLI, and of node_modules only the native
# addon the bundle cannot hold (scripts/image-layout.mjs; test/image-layout.test.ts runs the CLI
# from such a layout).
RUN npm run build && node scripts/image-layout.mjs /app

FROM node:24-bookworm-slim
ENV NODE_ENV=production
# Tuned for the sidecar, the image's most numerous process: a young generation capped at 4 MB,
# two malloc arenas, and blocks of 32 KiB or more (V8's compiler zones) mapped on their own so
# freeing them returns them. On this image's Node 24 a sidecar holds about 89 MB at 1,000 req/s
# with them (bench/results/latest.md; 72 MB on Node 20), and 117 MB after a saturating load
# without the young-generation cap, against 97 MB with it. Broker and collector deployments
# should set NODE_OPTIONS= (empty) to get V8's defaults.
ENV NODE_OPTIONS=--max-semi-space-size=4 MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=32768
COPY --from=build /app /app
# The audit spool and local state live here; mount a volume in production.
RUN mkdir -p /var/lib/latchkey && chown node:node /var/lib/latchkey
USER node
WORKDIR /var/lib/latchkey
# sidecar proxy, sidecar admin, broker
EXPOSE 15001 15002 15003
# Maglev, V8's mid-tier compiler (on by default since Node 22), held ~8 MB more RSS in a sidecar at
# 1,000 req/s on Node 24 (97-100 MB against 89-91 MB) for no CPU per request we could measure at
# 16 connections (0.99x, paired). It is not allowed in NODE_OPTIONS, so it is set here.
ENTRYPOINT ["node", "--no-maglev", "/app/dist/bin/latchkey.js"]
CMD ["sidecar", "--config", "/etc/latchkey/latchkey.yaml"]
