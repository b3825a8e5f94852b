CREATE TABLE transfers (
    id bigserial PRIMARY KEY,
    from_account bigint NOT NULL REFERENCES accounts (id),
    to_account bigint NOT NULL REFERENCES accounts (id),
    amount_cents bigint NOT NULL CHECK (amount_cents > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX transfers_from_idx ON transfers (from_account);
CREATE INDEX transfers_to_idx ON transfers (to_account);
