SELECT g::int2 AS i2, (g * 100000)::int4 AS i4, (9007199254740993 + g)::int8 AS i8,
       g * 1.5::float8 AS f8, (g / 4.0)::float4 AS f4,
       (12345678901234567890.123456789 * g)::numeric AS num, 'NaN'::numeric AS nan,
       'héllo, wörld ' || g AS t, ('x' || g)::varchar(5) AS vc, g % 2 = 0 AS b,
       '2024-02-29 13:14:15.123456+00'::timestamptz + g * interval '1 day 1 second' AS tstz,
       '2024-02-29 13:14:15.5'::timestamp - g * interval '1 hour' AS ts,
       '2024-02-29'::date + g AS d, make_interval(days => g, secs => 3.25) AS iv,
       ARRAY[g, 2, NULL, 4]::int4[] AS ia, ARRAY['a', 'b c', NULL, 'd"e']::text[] AS ta,
       ('\xdeadbeef00'::bytea || int4send(g)) AS by, json_build_object('a', g, 'b', ARRAY[1, 2]) AS j,
       jsonb_build_object('k', 'v', 'n', g * 1.5) AS jb,
       ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a' || lpad(g::text, 2, '0'))::uuid AS u,
       CASE WHEN g % 3 = 0 THEN NULL ELSE g END AS maybe, NULL::text AS nothing
FROM generate_series(1, 20) AS g
ORDER BY g
