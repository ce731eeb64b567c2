// Demo identity provider for the extauthz examples and end-to-end tests.
//
// A real, certified OpenID provider (npm `oidc-provider`) configured for machine-to-machine
// tokens only: discovery, JWKS, the `client_credentials` grant, RFC 7662 introspection and
// RFC 7009 revocation. It keeps everything in memory and signs with a key generated at start-up,
// so every run has fresh keys and nothing secret lives in the repository.
//
//   IDP_PORT=3000 node server.mjs            # issuer http://127.0.0.1:3000
//   IDP_ISSUER=http://idp.local:3000 ...     # override the advertised issuer
//
// The client secrets below are demo values for this throw-away IdP, not extauthz secrets.
// Do not use this file as a production IdP configuration.

import { generateKeyPairSync, createHash } from 'node:crypto';

import Provider, { errors } from 'oidc-provider';

const port = Number(process.env.IDP_PORT || 3000);
const host = process.env.IDP_HOST || '127.0.0.1';
const issuer = process.env.IDP_ISSUER || `http://127.0.0.1:${port}`;

// Resource servers (RFC 8707 resource indicators). A client asks for a token with
// `resource=<identifier>`; the token's `aud` is that identifier and its `scope` is the
// requested scopes filtered to the ones listed here.
const RESOURCE_SERVERS = {
  // The demo API: RS256 JWT access tokens that extauthz validates locally against the JWKS.
  'https://api.example.com': {
    scope: 'orders.read orders.write',
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  },
  // Another API on the same IdP: its tokens are valid JWTs with the wrong audience for orders.
  'https://other.example.com': {
    scope: 'orders.read orders.write other.read',
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  },
  // An API whose tokens are opaque strings: only introspection can validate them.
  'https://opaque.example.com': {
    scope: 'orders.read orders.write',
    accessTokenFormat: 'opaque',
  },
};

// Clients. `tenant` (and `email_verified`) become claims of every token the client gets, so the
// e2e tests can exercise verifyClaims: acme passes, globex has the wrong value, plain-client has
// no tenant at all, short-lived gets tokens that expire after 2 seconds.
const clientCredentialsClient = (clientId, extra = {}) => ({
  client_id: clientId,
  client_secret: `${clientId}-secret`,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_basic',
  ...extra,
});

const CLIENTS = [
  clientCredentialsClient('acme-client', { tenant: 'acme', email_verified: true }),
  clientCredentialsClient('globex-client', { tenant: 'globex', email_verified: true }),
  clientCredentialsClient('plain-client'),
  clientCredentialsClient('short-lived', { tenant: 'acme', access_token_ttl: 2 }),
  // The resource server itself (extauthz), for introspection; one client per auth method.
  clientCredentialsClient('extauthz', { grant_types: [] }),
  clientCredentialsClient('extauthz-post', {
    grant_types: [],
    token_endpoint_auth_method: 'client_secret_post',
  }),
];
const INTROSPECTING_CLIENTS = new Set(['extauthz', 'extauthz-post']);

// One RSA signing key, generated per run. The kid is the RFC 7638 JWK thumbprint.
function generateSigningKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  const thumbprint = createHash('sha256')
    .update(JSON.stringify({ e: jwk.e, kty: jwk.kty, n: jwk.n }))
    .digest('base64url');
  return { ...jwk, kid: thumbprint, alg: 'RS256', use: 'sig' };
}

const provider = new Provider(issuer, {
  clients: CLIENTS,
  // Lets the client definitions above carry these non-standard properties.
  extraClientMetadata: { properties: ['tenant', 'email_verified', 'access_token_ttl'] },
  jwks: { keys: [generateSigningKey()] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: {
      enabled: true,
      // Only the resource server may introspect (the default lets any confidential client).
      allowedPolicy: (ctx, client) => INTROSPECTING_CLIENTS.has(client.clientId),
    },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      getResourceServerInfo: (ctx, resourceIndicator) => {
        const info = RESOURCE_SERVERS[resourceIndicator];
        if (!info) throw new errors.InvalidTarget();
        return info;
      },
    },
  },
  // Claims added to every access token. For JWTs they sit next to iss/aud/scope; for opaque
  // tokens they show up in the introspection response.
  extraTokenClaims: (ctx, token) => {
    const client = ctx.oidc.client;
    const claims = {};
    if (client.tenant !== undefined) claims.tenant = client.tenant;
    if (client.email_verified !== undefined) claims.email_verified = client.email_verified;
    // oidc-provider introspection only reports `sub` for end-user tokens; a client_credentials
    // token's subject is the client, as its JWT form says (`sub` = client_id).
    if (token.resourceServer?.accessTokenFormat === 'opaque') claims.sub = token.clientId;
    return claims;
  },
  ttl: {
    ClientCredentials: (ctx, token, client) => client.access_token_ttl || 10 * 60,
  },
});

provider.listen(port, host, () => {
  console.log(`idp listening on ${issuer}`);
});

const stop = () => process.exit(0);
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
