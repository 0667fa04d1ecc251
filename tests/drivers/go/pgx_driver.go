// pgx (v4, Debian's golang-github-jackc-pgx-v4-dev) through the Causeway proxy (transaction
// pooling).
//
// Usage: pgx_driver URL PRIMARY_PORT
//
// Expects table drv_items (id int PRIMARY KEY, name text), empty and replayed on every replica.
// Prints `ok pgx <case>` or `FAIL pgx <case>: <error>` per case; exits 1 if any failed.
//
// pgx prepares every statement it runs with arguments as a named server-side statement
// (`lrupsc_N_M`) and caches it per connection, and a Batch sends several of them in one
// pipeline under a single Sync: almost every case here also checks that the proxy carries named
// statements across the backends a transaction-pooled client lands on.
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgx/v4"
)

const driver = "pgx"

var (
	url         = os.Args[1]
	primaryPort = mustAtoi(os.Args[2])
)

const caseTimeout = 8 * time.Second

func mustAtoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		panic(err)
	}
	return n
}

func check(cond bool, format string, args ...any) error {
	if !cond {
		return fmt.Errorf(format, args...)
	}
	return nil
}

// expectCode wants err to be a server error with SQLSTATE code.
func expectCode(err error, code, what string) error {
	if err == nil {
		return fmt.Errorf("%s: did not fail", what)
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return fmt.Errorf("%s: expected SQLSTATE %s, got %v", what, code, err)
	}
	return check(pgErr.Code == code, "%s: expected SQLSTATE %s, got %s: %s", what, code, pgErr.Code, pgErr.Message)
}

// withConn connects, runs fn, and closes the connection whatever fn did.
func withConn(ctx context.Context, fn func(*pgx.Conn) error) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return fn(conn)
}

// countOnPrimary counts rows in a read-write transaction, which runs on the primary, so it sees
// rows a replica may not have replayed yet.
func countOnPrimary(ctx context.Context, c *pgx.Conn, lo, hi int) (int, error) {
	var n int
	err := c.BeginFunc(ctx, func(tx pgx.Tx) error {
		return tx.QueryRow(ctx, "SELECT count(*)::int FROM drv_items WHERE id BETWEEN $1 AND $2", lo, hi).Scan(&n)
	})
	return n, err
}

func caseConnect(ctx context.Context) error {
	err := withConn(ctx, func(c *pgx.Conn) error {
		var user string
		if err := c.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil {
			return err
		}
		return check(user == "app", "current_user %q", user)
	})
	if err != nil {
		return err
	}
	bad := strings.Replace(url, ":app-secret@", ":wrong@", 1)
	if bad == url {
		return errors.New("URL has no :app-secret@ to corrupt")
	}
	conn, err := pgx.Connect(ctx, bad)
	if err == nil {
		conn.Close(ctx)
	}
	return expectCode(err, "28P01", "wrong password")
}

func caseSimpleQuery(ctx context.Context) error {
	return withConn(ctx, func(c *pgx.Conn) error {
		// pgconn's Exec sends a simple-protocol Query: several statements, a result each.
		results, err := c.PgConn().Exec(ctx, "SELECT 1 AS a; SELECT 'two' AS b").ReadAll()
		if err != nil {
			return err
		}
		if err := check(len(results) == 2, "%d results", len(results)); err != nil {
			return err
		}
		a, b := string(results[0].Rows[0][0]), string(results[1].Rows[0][0])
		return check(a == "1" && b == "two", "results %q, %q", a, b)
	})
}

func caseParameterizedQuery(ctx context.Context) error {
	return withConn(ctx, func(c *pgx.Conn) error {
		var s int
		var t string
		if err := c.QueryRow(ctx, "SELECT $1::int + $2::int, $3::text", 40, 2, "x").Scan(&s, &t); err != nil {
			return err
		}
		if err := check(s == 42 && t == "x", "got %d, %q", s, t); err != nil {
			return err
		}
		// A Batch: pgx prepares what its cache lacks, then sends every Bind/Execute under one
		// Sync. The write makes the whole pipeline the primary's, read-back included.
		batch := &pgx.Batch{}
		batch.Queue("INSERT INTO drv_items VALUES ($1, $2)", 700, "batched")
		batch.Queue("SELECT name, inet_server_port() FROM drv_items WHERE id = $1", 700)
		batch.Queue("SELECT $1::int * 3", 5)
		br := c.SendBatch(ctx, batch)
		if _, err := br.Exec(); err != nil {
			br.Close()
			return fmt.Errorf("batched insert: %w", err)
		}
		var name string
		var port, v int
		if err := br.QueryRow().Scan(&name, &port); err != nil {
			br.Close()
			return fmt.Errorf("batched read-back: %w", err)
		}
		if err := br.QueryRow().Scan(&v); err != nil {
			br.Close()
			return fmt.Errorf("batched third query: %w", err)
		}
		if err := br.Close(); err != nil {
			return err
		}
		return check(name == "batched" && port == primaryPort && v == 15,
			"batch read %q on port %d (primary %d), third %d", name, port, primaryPort, v)
	})
}

func casePreparedReuse(ctx context.Context) error {
	return withConn(ctx, func(c *pgx.Conn) error {
		// pgx's statement cache prepares each text once per connection, then sends only
		// Bind/Execute naming it; outside a transaction, runs may land on different replicas.
		for i := 0; i < 10; i++ {
			var v int
			if err := c.QueryRow(ctx, "SELECT $1::int * 2", i).Scan(&v); err != nil {
				return fmt.Errorf("run %d: %w", i, err)
			}
			if err := check(v == i*2, "run %d: got %d", i, v); err != nil {
				return err
			}
		}
		// An explicitly named statement, executed by its name.
		if _, err := c.Prepare(ctx, "drv_plus_port", "SELECT $1::int + 1, inet_server_port()"); err != nil {
			return err
		}
		return c.BeginFunc(ctx, func(tx pgx.Tx) error {
			for i := 0; i < 10; i++ {
				var v, port int
				if err := tx.QueryRow(ctx, "drv_plus_port", i).Scan(&v, &port); err != nil {
					return fmt.Errorf("in a transaction, run %d: %w", i, err)
				}
				if err := check(v == i+1 && port == primaryPort, "in a transaction, run %d: %d on port %d", i, v, port); err != nil {
					return err
				}
			}
			return nil
		})
	})
}

func caseTransaction(ctx context.Context) error {
	return withConn(ctx, func(c *pgx.Conn) error {
		tx, err := c.Begin(ctx)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO drv_items VALUES ($1, 'kept')", 1); err != nil {
			return err
		}
		if err := tx.Commit(ctx); err != nil {
			return err
		}
		if n, err := countOnPrimary(ctx, c, 1, 1); err != nil || n != 1 {
			return fmt.Errorf("committed row: count %d, %v", n, err)
		}
		tx, err = c.Begin(ctx)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO drv_items VALUES ($1, 'dropped')", 2); err != nil {
			return err
		}
		if err := tx.Rollback(ctx); err != nil {
			return err
		}
		if n, err := countOnPrimary(ctx, c, 2, 2); err != nil || n != 0 {
			return fmt.Errorf("rolled-back row: count %d, %v", n, err)
		}
		return nil
	})
}

func caseErrorRecovery(ctx context.Context) error {
	return withConn(ctx, func(c *pgx.Conn) error {
		tx, err := c.Begin(ctx)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO drv_items VALUES ($1, 'rolled back')", 10); err != nil {
			return err
		}
		var v int
		if err := expectCode(tx.QueryRow(ctx, "SELECT 1/0").Scan(&v), "22012", "division by zero"); err != nil {
			return err
		}
		if err := expectCode(tx.QueryRow(ctx, "SELECT 1").Scan(&v), "25P02", "statement in an aborted transaction"); err != nil {
			return err
		}
		if err := tx.Rollback(ctx); err != nil {
			return err
		}
		if err := c.QueryRow(ctx, "SELECT 7").Scan(&v); err != nil || v != 7 {
			return fmt.Errorf("connection unusable after ROLLBACK: %d, %v", v, err)
		}
		if n, err := countOnPrimary(ctx, c, 10, 10); err != nil || n != 0 {
			return fmt.Errorf("rolled-back row: count %d, %v", n, err)
		}
		return nil
	})
}

func caseCopy(ctx context.Context) error {
	return withConn(ctx, func(c *pgx.Conn) error {
		// CopyFrom sends binary COPY data.
		rows := make([][]any, 0, 500)
		for i := 100; i < 600; i++ {
			rows = append(rows, []any{i, fmt.Sprintf("copied %d", i)})
		}
		n, err := c.CopyFrom(ctx, pgx.Identifier{"drv_items"}, []string{"id", "name"}, pgx.CopyFromRows(rows))
		if err != nil {
			return err
		}
		if err := check(n == 500, "COPY FROM reported %d rows", n); err != nil {
			return err
		}
		// In a read-write transaction, so the primary answers: a replica may lag.
		var out bytes.Buffer
		err = c.BeginFunc(ctx, func(tx pgx.Tx) error {
			_, err := tx.Conn().PgConn().CopyTo(ctx, &out,
				"COPY (SELECT id, name FROM drv_items WHERE id BETWEEN 100 AND 599 ORDER BY id) TO STDOUT")
			return err
		})
		if err != nil {
			return err
		}
		lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
		if err := check(len(lines) == 500, "COPY TO returned %d lines", len(lines)); err != nil {
			return err
		}
		return check(lines[0] == "100\tcopied 100" && lines[499] == "599\tcopied 599", "row contents %q … %q", lines[0], lines[499])
	})
}

func caseListenNotify(ctx context.Context) error {
	return withConn(ctx, func(listener *pgx.Conn) error {
		if _, err := listener.Exec(ctx, "LISTEN drv_channel"); err != nil {
			return err
		}
		err := withConn(ctx, func(sender *pgx.Conn) error {
			_, err := sender.Exec(ctx, "NOTIFY drv_channel, 'hello'")
			return err
		})
		if err != nil {
			return err
		}
		wait, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		n, err := listener.WaitForNotification(wait)
		if err != nil {
			return fmt.Errorf("no notification within 5 s: %w", err)
		}
		return check(n.Channel == "drv_channel" && n.Payload == "hello", "got %+v", n)
	})
}

func caseCancel(ctx context.Context) error {
	// pgconn's CancelRequest opens a socket of its own to the proxy and sends the connection's
	// BackendKeyData. A cancel that arrives before the query reaches a backend cancels nothing,
	// and nothing says "running", so keep cancelling until the query ends.
	err := withConn(ctx, func(c *pgx.Conn) error {
		done := make(chan struct{})
		go func() {
			for {
				select {
				case <-done:
					return
				case <-time.After(300 * time.Millisecond):
					_ = c.PgConn().CancelRequest(ctx)
				}
			}
		}()
		t0 := time.Now()
		_, err := c.Exec(ctx, "SELECT pg_sleep(10)")
		close(done)
		if err := expectCode(err, "57014", "cancelled pg_sleep(10)"); err != nil {
			return err
		}
		if elapsed := time.Since(t0); elapsed > 5*time.Second {
			return fmt.Errorf("cancel took %v", elapsed)
		}
		var v int
		if err := c.QueryRow(ctx, "SELECT 9").Scan(&v); err != nil || v != 9 {
			return fmt.Errorf("connection unusable after cancel: %d, %v", v, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	// A context that expires makes pgx send a cancel request and drop the connection; the
	// server's statement must stop too, not sleep on in a pooled backend.
	err = withConn(ctx, func(c *pgx.Conn) error {
		short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		defer cancel()
		_, err := c.Exec(short, "/* causeway:primary */ SELECT pg_sleep(10)")
		return check(err != nil, "pg_sleep(10) outlived its context")
	})
	if err != nil {
		return err
	}
	return withConn(ctx, func(c *pgx.Conn) error {
		for start := time.Now(); ; time.Sleep(100 * time.Millisecond) {
			var n int
			err := c.QueryRow(ctx, "/* causeway:primary */ SELECT count(*)::int FROM pg_stat_activity "+
				"WHERE query LIKE '%SELECT pg_sleep(10)' AND state = 'active' AND pid <> pg_backend_pid()").Scan(&n)
			if err != nil {
				return err
			}
			if n == 0 {
				return nil
			}
			if time.Since(start) > 3*time.Second {
				return errors.New("the statement of an expired context still runs on the primary after 3 s")
			}
		}
	})
}

func caseReplicaRead(ctx context.Context) error {
	return withConn(ctx, func(c *pgx.Conn) error {
		// pgx never opens a transaction by itself, so this read may go to a replica.
		var port int
		if err := c.QueryRow(ctx, "SELECT inet_server_port()").Scan(&port); err != nil {
			return err
		}
		if err := check(port != primaryPort, "autocommit read ran on the primary (%d)", port); err != nil {
			return err
		}
		// A transaction that is not declared read-only may write at any point: the primary.
		err := c.BeginFunc(ctx, func(tx pgx.Tx) error {
			return tx.QueryRow(ctx, "SELECT inet_server_port()").Scan(&port)
		})
		if err != nil {
			return err
		}
		if err := check(port == primaryPort, "a read-write transaction ran on %d", port); err != nil {
			return err
		}
		// A read-only one (`begin isolation level … read only`) runs whole on one replica.
		ports := map[int]bool{}
		err = c.BeginTxFunc(ctx, pgx.TxOptions{AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
			for i := 0; i < 5; i++ {
				if err := tx.QueryRow(ctx, "SELECT inet_server_port() + $1", 0).Scan(&port); err != nil {
					return err
				}
				ports[port] = true
			}
			return nil
		})
		if err != nil {
			return err
		}
		return check(len(ports) == 1 && !ports[primaryPort], "a read-only transaction ran on %v", ports)
	})
}

func main() {
	cases := []struct {
		name string
		run  func(context.Context) error
	}{
		{"connect", caseConnect},
		{"simple_query", caseSimpleQuery},
		{"parameterized_query", caseParameterizedQuery},
		{"prepared_reuse", casePreparedReuse},
		{"transaction", caseTransaction},
		{"error_recovery", caseErrorRecovery},
		{"copy", caseCopy},
		{"listen_notify", caseListenNotify},
		{"cancel", caseCancel},
		{"replica_read", caseReplicaRead},
	}
	failed := 0
	for _, c := range cases {
		ctx, cancel := context.WithTimeout(context.Background(), caseTimeout)
		err := c.run(ctx)
		cancel()
		if err == nil {
			fmt.Printf("ok %s %s\n", driver, c.name)
		} else {
			failed++
			fmt.Printf("FAIL %s %s: %s\n", driver, c.name, strings.Join(strings.Fields(err.Error()), " "))
		}
	}
	if failed > 0 {
		os.Exit(1)
	}
}
