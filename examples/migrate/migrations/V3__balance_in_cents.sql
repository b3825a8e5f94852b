-- A data migration: applied twice it would multiply every balance by 10 000.
ALTER TABLE accounts ADD COLUMN balance_cents bigint;
UPDATE accounts SET balance_cents = (balance * 100)::bigint;
ALTER TABLE accounts ALTER COLUMN balance_cents SET NOT NULL;
ALTER TABLE accounts DROP COLUMN balance;
