// node-postgres (pg) through pgnear: the driver compatibility scenario (see tests/drivers.rs).
//
// Environment: PGNEAR_URL (through pgnear, TLS verify-full, SCRAM), DIRECT_URL (the primary,
// no pgnear), PGNEAR_REGION (the region of that pgnear). Exits non-zero with a message on
// failure.
//
// pg sends a query without values as a simple query, one with values through the extended
// protocol (an unnamed statement, or a named one when the query has a `name`).
'use strict';

const fs = require('fs');
const path = require('path');
const util = require('util');
const { pipeline } = require('stream/promises');
const { Readable, Writable } = require('stream');
const { Client } = require('pg');
const copyStreams = require('pg-copy-streams');

const PGNEAR_URL = process.env.PGNEAR_URL;
const DIRECT_URL = process.env.DIRECT_URL;
const REGION = process.env.PGNEAR_REGION;
const TYPES_SQL = fs.readFileSync(path.join(__dirname, 'types.sql'), 'utf8');
const T = 'drv_node';

function check(cond, what) {
  if (!cond) throw new Error(`assertion failed: ${what}`);
}

async function connect(url) {
  const c = new Client({ connectionString: url });
  await c.connect();
  return c;
}

async function value(c, q, values) {
  const r = await c.query({ text: q, values, rowMode: 'array' });
  return r.rows[0][0];
}

const onReplica = (c) => value(c, 'SELECT pg_is_in_recovery()');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function stepTlsAndScram(c) {
  const stream = c.connection.stream;
  check(stream.encrypted === true, 'the connection uses TLS');
  const proto = stream.getProtocol();
  check(proto === 'TLSv1.2' || proto === 'TLSv1.3', `TLS protocol ${proto}`);
  const bad = PGNEAR_URL.replace(`:${c.password}@`, ':wrong@');
  try {
    await (await connect(bad)).end();
    throw new Error('a wrong password was accepted');
  } catch (e) {
    check(e.code === '28P01', `wrong password: ${e.code} ${e.message}`);
  }
  return proto;
}

async function stepRouting(c) {
  check((await onReplica(c)) === true, 'a simple-query read runs on the replica');
  check((await value(c, 'SELECT pg_is_in_recovery() AND $1::bool', [true])) === true,
    'an extended-protocol read runs on the replica');
  await c.query(`DROP TABLE IF EXISTS ${T}`);
  await c.query(`CREATE TABLE ${T} (id int PRIMARY KEY, name text)`);
  check((await value(c, `INSERT INTO ${T} VALUES (0, 'zero') RETURNING pg_is_in_recovery()`)) === false,
    'a write runs on the primary');
  check((await value(c, 'SHOW pgnear.region')) === REGION, 'SHOW pgnear.region');
  check((await value(c, 'SHOW pgnear.route')) === 'auto', 'SHOW pgnear.route');
  await c.query("SET pgnear.route = 'primary'");
  check((await onReplica(c)) === false, "SET pgnear.route = 'primary' pins to the primary");
  await c.query("SET pgnear.route = 'auto'");
  check((await onReplica(c)) === true, "SET pgnear.route = 'auto' releases the pin");
  // The causal token: SHOW pgnear.write_lsn, and ParameterStatus after each committed write.
  let reported = null;
  c.connection.on('parameterStatus', (m) => {
    if (m.parameterName === 'pgnear.write_lsn') reported = m.parameterValue;
  });
  for (let i = 0; i < 10; i++) {
    await c.query(`UPDATE ${T} SET name = $1 WHERE id = 0`, [`v${i}`]);
    const lsn = await value(c, 'SHOW pgnear.write_lsn');
    check(/^[0-9A-F]+\/[0-9A-F]+$/.test(lsn), `SHOW pgnear.write_lsn after a write: ${lsn}`);
    check(reported === lsn, `ParameterStatus pgnear.write_lsn ${reported} == SHOW ${lsn}`);
  }
}

async function stepPrepared(c) {
  for (let i = 1; i <= 30; i++) {
    await c.query({
      name: 'drv_upsert',
      text: `INSERT INTO ${T} VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET name = excluded.name`,
      values: [1000 + i, `p${i}`],
    });
    const r = await c.query({
      name: 'drv_read',
      text: `SELECT pg_is_in_recovery() AS replica, name FROM ${T} WHERE id = $1`,
      values: [1000 + i],
    });
    check(util.isDeepStrictEqual(r.rows, [{ replica: true, name: `p${i}` }]),
      `named statement read ${i}: ${JSON.stringify(r.rows)}`);
  }
  const names = await c.query("SELECT name FROM pg_prepared_statements WHERE name LIKE 'drv_%' ORDER BY 1");
  check(names.rows.map((r) => r.name).includes('drv_read'), 'drv_read is prepared on the replica');
}

async function stepTransaction(c) {
  await c.query('BEGIN');
  check((await onReplica(c)) === false, 'a read in a read-write transaction runs on the primary');
  await c.query(`INSERT INTO ${T} VALUES ($1, 'tx')`, [2000]);
  check((await value(c, `SELECT count(*)::int FROM ${T} WHERE id = 2000`)) === 1, 'own write in tx');
  await c.query('COMMIT');
  const r = await c.query({ text: `SELECT name, pg_is_in_recovery() FROM ${T} WHERE id = 2000`, rowMode: 'array' });
  check(util.isDeepStrictEqual(r.rows, [['tx', true]]), `committed row on the replica: ${JSON.stringify(r.rows)}`);
  await c.query('BEGIN');
  await c.query(`INSERT INTO ${T} VALUES (2001, 'rolled back')`);
  await c.query('ROLLBACK');
  check((await value(c, `SELECT count(*)::int FROM ${T} WHERE id = 2001`)) === 0, 'rollback');
  await c.query('BEGIN');
  try {
    await c.query(`INSERT INTO ${T} VALUES (2000, 'duplicate')`);
    throw new Error('a duplicate key was accepted');
  } catch (e) {
    check(e.code === '23505', `duplicate: ${e.code}`);
  }
  try {
    await c.query('SELECT 1');
    throw new Error('a failed transaction accepted a statement');
  } catch (e) {
    check(e.code === '25P02', `in a failed transaction: ${e.code}`);
  }
  await c.query('ROLLBACK');
  await c.query('BEGIN READ ONLY');
  check((await onReplica(c)) === true, 'a read-only transaction runs on the replica');
  await c.query('COMMIT');
}

async function stepReadYourWrites(c) {
  for (let i = 0; i < 100; i++) {
    await c.query(`INSERT INTO ${T} VALUES ($1, $2)`, [3000 + i, `ryw${i}`]);
    const v = await value(c, `SELECT name FROM ${T} WHERE id = $1`, [3000 + i]);
    check(v === `ryw${i}`, `read-your-writes ${i}: ${v}`);
  }
}

async function stepListenNotify(c) {
  const listener = await connect(PGNEAR_URL);
  try {
    const got = [];
    listener.on('notification', (m) => got.push(`${m.channel}:${m.payload}`));
    await listener.query('LISTEN drv_node');
    check((await onReplica(listener)) === false, 'LISTEN pins the session to the primary');
    await c.query("NOTIFY drv_node, 'one'");
    await c.query("SELECT pg_notify('drv_node', $1)", ['two']);
    for (let i = 0; i < 600 && got.length < 2; i++) await sleep(50);
    check(util.isDeepStrictEqual(got, ['drv_node:one', 'drv_node:two']), `notifications: ${got}`);
    await listener.query('UNLISTEN *');
    check((await onReplica(listener)) === true, 'UNLISTEN * releases the pin');
  } finally {
    await listener.end();
  }
}

async function stepCopy(c) {
  await c.query(`DROP TABLE IF EXISTS ${T}_copy`);
  await c.query(`CREATE TABLE ${T}_copy (id int, name text)`);
  const lines = Array.from({ length: 1000 }, (_, i) => `${i}\trow ${i}\n`);
  const sink = c.query(copyStreams.from(`COPY ${T}_copy (id, name) FROM STDIN`));
  await pipeline(Readable.from(lines), sink);
  check(sink.rowCount === 1000, `COPY FROM rows: ${sink.rowCount}`);
  const r = await c.query({ text: `SELECT count(*)::int, pg_is_in_recovery() FROM ${T}_copy`, rowMode: 'array' });
  check(util.isDeepStrictEqual(r.rows, [[1000, true]]), `copied rows on the replica: ${JSON.stringify(r.rows)}`);
  const chunks = [];
  const source = c.query(copyStreams.to(`COPY (SELECT id, name FROM ${T}_copy ORDER BY id) TO STDOUT`));
  await pipeline(source, new Writable({ write(chunk, _enc, cb) { chunks.push(chunk); cb(); } }));
  const text = Buffer.concat(chunks).toString();
  check(text === lines.join(''), 'COPY TO returns what COPY FROM wrote');
}

async function stepCancel(c) {
  const running = c.query('SELECT pg_sleep(60)');
  let done = false;
  const outcome = running.then(() => 'finished', (e) => e).finally(() => { done = true; });
  // A cancel that arrives before the query starts is lost: send it until the query ends.
  while (!done) {
    await sleep(300);
    if (done || !c.activeQuery) continue;
    const canceller = new Client({ connectionString: PGNEAR_URL });
    canceller.cancel(c, c.activeQuery);
  }
  const e = await outcome;
  check(e !== 'finished', 'pg_sleep(60) finished: the cancel did not reach it');
  check(e.code === '57014', `cancel: ${e.code} ${e.message}`);
  check((await onReplica(c)) === true, 'the session works after the cancel');
}

async function fetchTypes(c, binary) {
  const r = await c.query({ text: TYPES_SQL, binary, rowMode: 'array' });
  return { types: r.fields.map((f) => f.dataTypeID), rows: r.rows };
}

async function stepTypes(c) {
  const direct = await connect(DIRECT_URL);
  try {
    check((await onReplica(direct)) === false, 'the direct URL is the primary');
    for (const binary of [false, true]) {
      const a = await fetchTypes(c, binary);
      const b = await fetchTypes(direct, binary);
      check(a.rows.length === 20, '20 rows');
      check(util.isDeepStrictEqual(a.types, b.types), `column types (binary=${binary})`);
      for (let i = 0; i < a.rows.length; i++) {
        check(util.isDeepStrictEqual(a.rows[i], b.rows[i]),
          `row ${i} through pgnear ${util.inspect(a.rows[i])} == direct ${util.inspect(b.rows[i])} (binary=${binary})`);
      }
    }
    const q = 'SELECT $1::bytea, $2::numeric, $3::int8[], $4::jsonb, $5::timestamptz, $6::text';
    const values = [Buffer.from([0, 255]), '-1.50', [1, null, 3], { a: [1, 'x'] }, new Date(Date.UTC(2024, 0, 2, 3, 4, 5, 678)), null];
    const a = await c.query({ text: q, values, rowMode: 'array' });
    const b = await direct.query({ text: q, values, rowMode: 'array' });
    check(util.isDeepStrictEqual(a.rows, b.rows), `parameters round trip: ${util.inspect(a.rows)} == ${util.inspect(b.rows)}`);
  } finally {
    await direct.end();
  }
}

async function main() {
  const pgVersion = require('pg/package.json').version;
  const copyVersion = require('pg-copy-streams/package.json').version;
  console.log(`driver: pg ${pgVersion} (pg-copy-streams ${copyVersion}, Node.js ${process.version})`);
  const steps = [
    ['SCRAM + TLS', stepTlsAndScram],
    ['routing and in-band commands', stepRouting],
    ['prepared statements', stepPrepared],
    ['transactions', stepTransaction],
    ['read-your-writes', stepReadYourWrites],
    ['LISTEN/NOTIFY', stepListenNotify],
    ['COPY', stepCopy],
    ['cancel', stepCancel],
    ['text and binary results', stepTypes],
  ];
  const failed = [];
  let c = await connect(PGNEAR_URL);
  for (const [name, step] of steps) {
    try {
      const extra = await step(c);
      console.log(`ok: ${name}${extra ? ` (${extra})` : ''}`);
    } catch (e) {
      console.log(e.stack);
      console.log(`FAIL: node-postgres: ${name}: ${e.message}`);
      failed.push(name);
      c.end().catch(() => {});
      c = await connect(PGNEAR_URL);
    }
  }
  await c.end();
  if (failed.length) {
    console.error(`node-postgres: ${failed.length} step(s) failed: ${failed.join(', ')}`);
    process.exit(1);
  }
  console.log('node-postgres: all steps passed');
}

main().catch((e) => {
  console.error(`node-postgres: ${e.stack}`);
  process.exit(1);
});
