-- Who may write and read. A token is shown once, at creation; only the
-- SHA-256 of its secret is kept. A device may instead present a client
-- certificate (mTLS): then the SHA-256 of its DER encoding names the token.
CREATE TABLE locus_tokens (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL,
    role        text        NOT NULL CHECK (role IN ('device', 'gateway', 'reader', 'admin')),
    -- Every role but admin is bound to one app_source.
    app_source  text        CHECK ((role = 'admin') = (app_source IS NULL)),
    -- A device token writes for these devices only.
    device_ids  uuid[]      NOT NULL DEFAULT '{}'
                            CHECK (role <> 'device' OR cardinality(device_ids) > 0),
    secret_sha256 bytea     CHECK (octet_length(secret_sha256) = 32),
    cert_sha256   bytea     UNIQUE CHECK (octet_length(cert_sha256) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK (secret_sha256 IS NOT NULL OR cert_sha256 IS NOT NULL)
);
-- Each instance polls for revocations every second or so.
CREATE INDEX locus_tokens_revoked_at_idx ON locus_tokens (revoked_at) WHERE revoked_at IS NOT NULL;
