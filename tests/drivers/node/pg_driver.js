// node-postgres (`pg`) through the Causeway proxy (transaction pooling).
//
// Usage: node pg_driver.js URL PRIMARY_PORT
//
// Expects table drv_items (id int PRIMARY KEY, name text), empty and replayed on every replica.
// Prints `ok node-pg <case>`, `FAIL node-pg <case>: <error>` or `skip node-pg <case>: <reason>`
// per case; exits 1 if any failed.
'use strict'

const { pipeline } = require('node:stream/promises')
const { Readable, Writable } = require('node:stream')
const pg = require('pg')
const copyStreams = require('pg-copy-streams')

const DRIVER = 'node-pg'
const URL = process.argv[2]
const PRIMARY_PORT = Number(process.argv[3])
const CASE_TIMEOUT_MS = 8000

/** Connects a client; `with(fn)` ends it whatever fn does. */
async function withClient(fn, url = URL) {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5000 })
  // An 'error' event with no listener would crash the process (e.g. the proxy closing).
  client.on('error', () => {})
  await client.connect()
  try {
    return await fn(client)
  } finally {
    await client.end().catch(() => {})
  }
}

function check(cond, message) {
  if (!cond) throw new Error(message)
}

/** Runs `promise` and expects it to fail with SQLSTATE `code`. */
async function expectCode(promise, code, what) {
  try {
    await promise
  } catch (e) {
    check(e.code === code, `${what}: expected SQLSTATE ${code}, got ${e.code}: ${e.message}`)
    return e
  }
  throw new Error(`${what}: did not fail`)
}

// A read-write transaction runs on the primary, so it sees rows a replica may not have
// replayed yet.
async function countOnPrimary(client, lo, hi) {
  await client.query('BEGIN')
  const r = await client.query('SELECT count(*)::int AS n FROM drv_items WHERE id BETWEEN $1 AND $2', [lo, hi])
  await client.query('COMMIT')
  return r.rows[0].n
}

async function caseConnect() {
  await withClient(async (c) => {
    const r = await c.query('SELECT current_user AS u')
    check(r.rows[0].u === 'app', `current_user ${r.rows[0].u}`)
  })
  const bad = URL.replace(':app-secret@', ':wrong@')
  check(bad !== URL, 'URL has no :app-secret@ to corrupt')
  await expectCode(withClient(async () => {}, bad), '28P01', 'wrong password')
}

async function caseSimpleQuery() {
  await withClient(async (c) => {
    // No values: node-pg sends a simple-protocol Query, so several statements work and each
    // gets its own result.
    const results = await c.query("SELECT 1 AS a; SELECT 'two' AS b")
    check(Array.isArray(results) && results.length === 2, `results: ${JSON.stringify(results)}`)
    check(results[0].rows[0].a === 1 && results[1].rows[0].b === 'two', 'result contents')
  })
}

async function caseParameterizedQuery() {
  await withClient(async (c) => {
    const r = await c.query('SELECT $1::int + $2::int AS s, $3::text AS t', [40, 2, 'x'])
    check(r.rows[0].s === 42 && r.rows[0].t === 'x', `got ${JSON.stringify(r.rows)}`)
  })
}

async function casePreparedReuse() {
  await withClient(async (c) => {
    // `name:` makes node-pg Parse a named statement once per connection and then send only
    // Bind/Execute naming it. Outside a transaction, runs may land on different replicas.
    for (let i = 0; i < 10; i++) {
      const r = await c.query({ name: 'drv_double', text: 'SELECT $1::int * 2 AS v', values: [i] })
      check(r.rows[0].v === i * 2, `run ${i}: ${JSON.stringify(r.rows)}`)
    }
    await c.query('BEGIN')
    for (let i = 0; i < 10; i++) {
      const r = await c.query({
        name: 'drv_plus_port',
        text: 'SELECT $1::int + 1 AS v, inet_server_port() AS port',
        values: [i],
      })
      check(r.rows[0].v === i + 1 && r.rows[0].port === PRIMARY_PORT, `in a transaction, run ${i}: ${JSON.stringify(r.rows)}`)
    }
    await c.query('COMMIT')
  })
}

async function caseTransaction() {
  await withClient(async (c) => {
    await c.query('BEGIN')
    await c.query("INSERT INTO drv_items VALUES ($1, 'kept')", [1])
    await c.query('COMMIT')
    check((await countOnPrimary(c, 1, 1)) === 1, 'committed row not visible')
    await c.query('BEGIN')
    await c.query("INSERT INTO drv_items VALUES ($1, 'dropped')", [2])
    await c.query('ROLLBACK')
    check((await countOnPrimary(c, 2, 2)) === 0, 'rolled-back row visible')
  })
}

async function caseErrorRecovery() {
  await withClient(async (c) => {
    await c.query('BEGIN')
    await c.query("INSERT INTO drv_items VALUES ($1, 'rolled back')", [10])
    await expectCode(c.query('SELECT 1/0'), '22012', 'division by zero')
    await expectCode(c.query('SELECT 1'), '25P02', 'statement in an aborted transaction')
    await c.query('ROLLBACK')
    const r = await c.query('SELECT 7 AS v')
    check(r.rows[0].v === 7, 'connection unusable after ROLLBACK')
    check((await countOnPrimary(c, 10, 10)) === 0, 'rolled-back row visible')
  })
}

async function caseCopy() {
  await withClient(async (c) => {
    const rows = []
    for (let i = 100; i < 600; i++) rows.push(`${i}\tcopied ${i}\n`)
    const sink = c.query(copyStreams.from('COPY drv_items (id, name) FROM STDIN'))
    await pipeline(Readable.from(rows), sink)
    check(sink.rowCount === 500, `COPY FROM reported ${sink.rowCount} rows`)
    // In a read-write transaction, so the primary answers: a replica may lag.
    await c.query('BEGIN')
    const chunks = []
    const source = c.query(copyStreams.to(
      'COPY (SELECT id, name FROM drv_items WHERE id BETWEEN 100 AND 599 ORDER BY id) TO STDOUT'))
    await pipeline(source, new Writable({
      write(chunk, _enc, done) {
        chunks.push(chunk)
        done()
      },
    }))
    await c.query('COMMIT')
    const lines = Buffer.concat(chunks).toString().split('\n').filter((l) => l !== '')
    check(lines.length === 500, `COPY TO returned ${lines.length} lines`)
    check(lines[0] === '100\tcopied 100' && lines[499] === '599\tcopied 599', 'row contents')
  })
}

async function caseListenNotify() {
  await withClient(async (listener) => {
    await withClient(async (sender) => {
      const got = new Promise((resolve) => listener.once('notification', resolve))
      await listener.query('LISTEN drv_channel')
      await sender.query("NOTIFY drv_channel, 'hello'")
      const n = await Promise.race([got, sleep(5000).then(() => null)])
      check(n !== null, 'no notification within 5 s')
      check(n.channel === 'drv_channel' && n.payload === 'hello', `got ${JSON.stringify(n)}`)
    })
  })
}

async function caseCancel() {
  await withClient(async (c) => {
    // node-pg's cancel: a second, unconnected Client opens its own socket to the same
    // host and port (the proxy) and sends a CancelRequest with the first client's
    // BackendKeyData. A cancel that arrives before the query reaches a backend cancels
    // nothing, and nothing says "running", so keep cancelling until the query ends.
    const query = c.query(new pg.Query('SELECT pg_sleep(10)'))
    const outcome = new Promise((resolve) => {
      query.once('error', (e) => resolve(e))
      query.once('end', () => resolve(null))
    })
    const t0 = Date.now()
    let done = false
    const canceller = (async () => {
      while (!done) {
        await sleep(300)
        if (done) break
        const other = new pg.Client({ connectionString: URL })
        other.on('error', () => {})
        other.cancel(c, query)
      }
    })()
    const err = await outcome
    done = true
    await canceller
    const elapsed = (Date.now() - t0) / 1000
    check(err !== null, 'pg_sleep(10) completed without being cancelled')
    check(err.code === '57014', `expected SQLSTATE 57014, got ${err.code}: ${err.message}`)
    check(elapsed < 5, `cancel took ${elapsed.toFixed(1)} s`)
    const r = await c.query('SELECT 9 AS v')
    check(r.rows[0].v === 9, 'connection unusable after cancel')
  })
}

async function caseReplicaRead() {
  await withClient(async (c) => {
    // node-pg never opens a transaction by itself, so this read is outside any transaction
    // and may go to a replica.
    let r = await c.query('SELECT inet_server_port() AS port')
    check(r.rows[0].port !== PRIMARY_PORT, `autocommit read ran on the primary (${r.rows[0].port})`)
    // A transaction that is not declared read-only may write at any point, so the proxy
    // runs all of it on the primary.
    await c.query('BEGIN')
    r = await c.query('SELECT inet_server_port() AS port')
    await c.query('COMMIT')
    check(r.rows[0].port === PRIMARY_PORT, `a read-write transaction ran on ${r.rows[0].port}`)
  })
}

const CASES = [
  ['connect', caseConnect],
  ['simple_query', caseSimpleQuery],
  ['parameterized_query', caseParameterizedQuery],
  ['prepared_reuse', casePreparedReuse],
  ['transaction', caseTransaction],
  ['error_recovery', caseErrorRecovery],
  ['copy', caseCopy],
  ['listen_notify', caseListenNotify],
  ['cancel', caseCancel],
  ['replica_read', caseReplicaRead],
]

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

async function run(fn) {
  let timer
  const timeout = new Promise((resolve) => {
    timer = setTimeout(() => resolve(`timed out after ${CASE_TIMEOUT_MS / 1000} s`), CASE_TIMEOUT_MS)
  })
  const result = fn().then(
    () => null,
    (e) => `${e.code ? `[SQLSTATE ${e.code}] ` : ''}${e.message || e}`
  )
  try {
    return await Promise.race([result, timeout])
  } finally {
    clearTimeout(timer)
  }
}

async function main() {
  let failed = 0
  for (const [name, fn] of CASES) {
    const error = await run(fn)
    if (error === null) {
      console.log(`ok ${DRIVER} ${name}`)
    } else {
      failed++
      console.log(`FAIL ${DRIVER} ${name}: ${error.split(/\s+/).join(' ')}`)
    }
  }
  // process.exit: a timed-out case may leave a socket open.
  process.exitCode = failed ? 1 : 0
  process.stdout.write('', () => process.exit(process.exitCode))
}

main()
