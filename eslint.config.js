import js from '@eslint/js'
import tseslint from 'typescript-eslint'

export default tseslint.config(
  { ignores: ['dist/', 'node_modules/', 'bench/results/', 'protos/gen/', '**/*.generated.ts', '.tap/'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: { globals: { process: 'readonly', console: 'readonly', Buffer: 'readonly', setTimeout: 'readonly', clearTimeout: 'readonly', setInterval: 'readonly', clearInterval: 'readonly', setImmediate: 'readonly', URL: 'readonly', performance: 'readonly', fetch: 'readonly', URLSearchParams: 'readonly' } },
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      'no-constant-condition': ['error', { checkLoops: false }],
      // ipaddr.js reads `::a.b.c.d` as `::ffff:a.b.c.d`, another destination: lib/ip-address.ts.
      'no-restricted-properties': [
        'error',
        ...['parse', 'process', 'parseCIDR'].map((property) => ({ object: 'ipaddr', property, message: 'use parseIp, processIp or parseCidr (lib/ip-address.ts): ipaddr.js misreads ::a.b.c.d' })),
      ],
    },
  },
  { files: ['lib/ip-address.ts'], rules: { 'no-restricted-properties': 'off' } },
)
