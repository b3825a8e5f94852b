CREATE VIEW account_totals AS
SELECT count(*) AS accounts, sum(balance_cents) AS total_cents FROM accounts;
