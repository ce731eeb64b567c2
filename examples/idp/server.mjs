// Demo identity provider for the extauthz examples and end-to-end tests.
//
// A real, certified OpenID provider (npm `oidc-provider`) configured for machine-to-machine
// tokens only: discovery, JWKS, the `client_credentials` grant, RFC 7662 introspection and
// RFC 7009 revocation, and sender-constrained tokens: DPoP-bound (RFC 9449) and
// certificate-bound (RFC 8705). It keeps everything in memory and signs with a key generated at
// start-up, so every run has fresh keys and nothing secret lives in the repository.
//
//   IDP_PORT=3000 node server.mjs            # issuer http://127.0.0.1:3000
//   IDP_ISSUER=http://idp.local:3000 ...     # override the advertised issuer
//
// The client secrets below are demo values for this throw-away IdP, not extauthz secrets.
// Do not use this file as a production IdP configuration.

import { generateKeyPairSync, createHash, X509Certificate } from 'node:crypto';

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
  // An API that accepts sender-constrained tokens only (extauthz senderConstraint DPOP, MTLS or
  // DPOP_OR_MTLS), as JWTs and as opaque tokens. Its own audiences, so that a bound token is
  // never one the bearer APIs above accept. The binding (`cnf`) comes from the client: a
  // dpop_bound_access_tokens client's tokens carry `cnf.jkt`, a
  // tls_client_certificate_bound_access_tokens client's `cnf.x5t#S256`; for opaque tokens the
  // introspection answer carries that `cnf`.
  'https://bound.example.com': {
    scope: 'orders.read orders.write',
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  },
  'https://bound-opaque.example.com': {
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
  // Sender-constrained tokens. dpop-client must send a DPoP proof (RFC 9449 §5) to the token
  // endpoint and its tokens are bound to the proof's key (`cnf.jkt`). mtls-client's tokens are
  // bound to the client certificate it presented (RFC 8705 §3, `cnf.x5t#S256`); it still
  // authenticates with its secret (the certificate binds, it does not authenticate).
  clientCredentialsClient('dpop-client', {
    tenant: 'acme',
    email_verified: true,
    dpop_bound_access_tokens: true,
  }),
  clientCredentialsClient('mtls-client', {
    tenant: 'acme',
    email_verified: true,
    tls_client_certificate_bound_access_tokens: true,
  }),
  // The resource server itself (extauthz), for introspection; one client per auth method.
  clientCredentialsClient('extauthz', { grant_types: [] }),
  clientCredentialsClient('extauthz-post', {
    grant_types: [],
    token_endpoint_auth_method: 'client_secret_post',
  }),
];
const INTROSPECTING_CLIENTS = new Set(['extauthz', 'extauthz-post']);

// The client certificate of a token request, for certificate-bound tokens (RFC 8705 §3).
// DEMO SHORTCUT: this IdP listens on plain HTTP, so it sees no TLS client certificate; it reads
// the certificate from the `x-client-cert` request header (URL-encoded PEM, the encoding of
// Envoy's attributes.source.certificate and XFCC `Cert`), which the tests set. Anyone can send
// that header: a real IdP takes the certificate from its own TLS handshake, or from a
// TLS-terminating proxy that verified the chain and strips a client-sent copy.
const CLIENT_CERT_HEADER = 'x-client-cert';

function clientCertificate(ctx) {
  const sent = ctx.get(CLIENT_CERT_HEADER);
  if (!sent) return undefined;
  try {
    return new X509Certificate(decodeURIComponent(sent));
  } catch {
    return undefined; // unreadable: no certificate, so no certificate-bound token is issued
  }
}

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
    // RFC 9449: a token request with a DPoP proof gets a token bound to the proof's key (any
    // client; dpop-client must send one). Proofs: ES256, Ed25519/EdDSA (oidc-provider's default
    // enabledJWA.dPoPSigningAlgValues); no server nonce.
    dPoP: { enabled: true },
    // RFC 8705 §3: certificate-bound access tokens for the clients that ask for them
    // (tls_client_certificate_bound_access_tokens). Clients still authenticate with secrets:
    // tlsClientAuth and selfSignedTlsClientAuth stay off.
    mTLS: {
      enabled: true,
      certificateBoundAccessTokens: true,
      getCertificate: clientCertificate,
    },
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
