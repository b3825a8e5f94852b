INSERT INTO accounts (email, balance)
SELECT 'user' || g || '@example.com', g * 1.25
FROM generate_series(1, 1000) AS g;
