-- Fills :"table" with :rows Koan-layout orders ("Id" text key, "Json" jsonb
-- document of ~330 bytes as text, 307-370). Deterministic: row i is always the same.
-- psql -v table=Order -v rows=2000000 -f bench/orders.sql
CREATE TABLE :"table" ("Id" text NOT NULL, "Json" jsonb NOT NULL);
INSERT INTO :"table"
SELECT 'order-' || lpad(i::text, 10, '0'),
  jsonb_build_object(
    '__koan_tenant', 'tenant-' || (i % 7),
    'version', 1 + i % 3,
    'createdAt', to_char(timestamp '2024-01-01' + (i % 31536000) * interval '1 second', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
    'status', (ARRAY['new','paid','packed','shipped','delivered','cancelled'])[1 + i % 6],
    'customer', jsonb_build_object(
      'id', 'cust-' || (i::bigint * 7919 % 100003),
      'email', 'c' || (i::bigint * 7919 % 100003) || '@example.com'),
    'city', (ARRAY['Berlin','Lyon','Porto','Oslo','Gdansk','Turin','Ghent'])[1 + i % 7],
    'lines', CASE WHEN i % 2 = 0
      THEN jsonb_build_array(
        jsonb_build_object('sku', 'SKU-' || (i * 131 % 5000), 'qty', 1 + i % 4, 'price', round((i * 37 % 20000) / 100.0 + 0.99, 2)))
      ELSE jsonb_build_array(
        jsonb_build_object('sku', 'SKU-' || (i * 131 % 5000), 'qty', 1 + i % 4, 'price', round((i * 37 % 20000) / 100.0 + 0.99, 2)),
        jsonb_build_object('sku', 'SKU-' || (i * 17 % 5000), 'qty', 1 + i % 3, 'price', round((i * 53 % 9000) / 100.0 + 0.49, 2)))
      END,
    'total', round((i * 97 % 90000) / 100.0 + 5, 2),
    'payment', jsonb_build_object('method', (ARRAY['card','invoice','paypal'])[1 + i % 3], 'ref', substr(md5(i::text), 1, 10)))
FROM generate_series(1, :rows) AS i;
ALTER TABLE :"table" ADD PRIMARY KEY ("Id");
VACUUM (FREEZE, ANALYZE) :"table";
