// pgjdbc through the Causeway proxy (transaction pooling).
//
// Usage: java -cp target/drivers/java:/usr/share/java/postgresql.jar PgjdbcDriver \
//            jdbc:postgresql://127.0.0.1:PROXY_PORT/app PRIMARY_PORT
// (user app / password app-secret are set here as properties).
//
// Expects table drv_items (id int PRIMARY KEY, name text), empty and replayed on every replica.
// Prints `ok pgjdbc <case>` or `FAIL pgjdbc <case>: <error>` per case; exits 1 if any failed.

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.ThreadFactory;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicBoolean;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;

public final class PgjdbcDriver {
    private static final String DRIVER = "pgjdbc";
    private static final long CASE_TIMEOUT_S = 8;

    private static String url;
    private static int primaryPort;

    interface Case {
        void run() throws Exception;
    }

    private PgjdbcDriver() {}

    /** A connection with the test login; `extra` are further driver properties. */
    private static Connection connect(String... extra) throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", "app");
        p.setProperty("password", "app-secret");
        p.setProperty("connectTimeout", "5");
        p.setProperty("prepareThreshold", "5");
        for (int i = 0; i + 1 < extra.length; i += 2) {
            p.setProperty(extra[i], extra[i + 1]);
        }
        return DriverManager.getConnection(url, p);
    }

    private static void check(boolean cond, String message) {
        if (!cond) {
            throw new AssertionError(message);
        }
    }

    private static Object one(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            check(rs.next(), "no row from " + sql);
            return rs.getObject(1);
        }
    }

    /** Runs `sql` and expects it to fail with SQLSTATE `state`. */
    private static void expectState(Connection c, String sql, String state) {
        try (Statement s = c.createStatement()) {
            s.execute(sql);
        } catch (SQLException e) {
            check(state.equals(e.getSQLState()),
                sql + ": expected SQLSTATE " + state + ", got " + e.getSQLState() + ": " + e.getMessage());
            return;
        }
        throw new AssertionError(sql + ": did not fail");
    }

    // A read-write transaction runs on the primary, so it sees rows a replica may not have
    // replayed yet.
    private static long countOnPrimary(Connection c, int lo, int hi) throws SQLException {
        boolean auto = c.getAutoCommit();
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement("SELECT count(*) FROM drv_items WHERE id BETWEEN ? AND ?")) {
            ps.setInt(1, lo);
            ps.setInt(2, hi);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                return rs.getLong(1);
            }
        } finally {
            c.commit();
            c.setAutoCommit(auto);
        }
    }

    static void caseConnect() throws Exception {
        try (Connection c = connect()) {
            check("app".equals(one(c, "SELECT current_user")), "current_user");
        }
        Properties bad = new Properties();
        bad.setProperty("user", "app");
        bad.setProperty("password", "wrong");
        bad.setProperty("connectTimeout", "5");
        try {
            DriverManager.getConnection(url, bad).close();
            throw new AssertionError("a wrong password was accepted");
        } catch (SQLException e) {
            check("28P01".equals(e.getSQLState()), "wrong password: SQLSTATE " + e.getSQLState() + ": " + e.getMessage());
        }
    }

    static void caseSimpleQuery() throws Exception {
        // preferQueryMode=simple: every statement goes as a simple-protocol Query. (By default
        // pgjdbc sends even parameterless statements through Parse/Bind/Execute.)
        try (Connection c = connect("preferQueryMode", "simple"); Statement s = c.createStatement()) {
            check(s.execute("SELECT 1; SELECT 'two'"), "first result is not a result set");
            try (ResultSet rs = s.getResultSet()) {
                check(rs.next() && rs.getInt(1) == 1, "first result");
            }
            check(s.getMoreResults(), "no second result set");
            try (ResultSet rs = s.getResultSet()) {
                check(rs.next() && "two".equals(rs.getString(1)), "second result");
            }
        }
        try (Connection c = connect()) {
            check(Integer.valueOf(3).equals(one(c, "SELECT 3")), "extended protocol, no parameters");
        }
    }

    static void caseParameterizedQuery() throws Exception {
        try (Connection c = connect();
             PreparedStatement ps = c.prepareStatement("SELECT ?::int + ?::int, ?::text")) {
            ps.setInt(1, 40);
            ps.setInt(2, 2);
            ps.setString(3, "x");
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next() && rs.getInt(1) == 42 && "x".equals(rs.getString(2)), "result");
            }
        }
    }

    static void casePreparedReuse() throws Exception {
        try (Connection c = connect()) {
            // prepareThreshold=5: from the 5th execution pgjdbc uses a named server statement
            // (S_1) and later only Binds it. Autocommit, so runs may land on different replicas.
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int * 2")) {
                for (int i = 0; i < 10; i++) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next() && rs.getInt(1) == i * 2, "run " + i);
                    }
                }
                check(ps.unwrap(PGStatement.class).isUseServerPrepare(), "never switched to a server-side statement");
            }
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int + 1, inet_server_port()")) {
                for (int i = 0; i < 10; i++) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next() && rs.getInt(1) == i + 1 && rs.getInt(2) == primaryPort,
                            "in a transaction, run " + i);
                    }
                }
            }
            c.commit();
        }
    }

    static void caseTransaction() throws Exception {
        try (Connection c = connect()) {
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.executeUpdate("INSERT INTO drv_items VALUES (1, 'kept')");
                c.commit();
                check(countOnPrimary(c, 1, 1) == 1, "committed row not visible");
                s.executeUpdate("INSERT INTO drv_items VALUES (2, 'dropped')");
                c.rollback();
                check(countOnPrimary(c, 2, 2) == 0, "rolled-back row visible");
            }
        }
    }

    static void caseErrorRecovery() throws Exception {
        try (Connection c = connect()) {
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.executeUpdate("INSERT INTO drv_items VALUES (10, 'rolled back')");
            }
            expectState(c, "SELECT 1/0", "22012");
            expectState(c, "SELECT 1", "25P02");
            c.rollback();
            check(Integer.valueOf(7).equals(one(c, "SELECT 7")), "connection unusable after ROLLBACK");
            c.commit();
            check(countOnPrimary(c, 10, 10) == 0, "rolled-back row visible");
        }
    }

    /** autosave=always (a common Spring setting): pgjdbc sends BEGIN through the extended
     *  protocol without a Sync, then SAVEPOINT as a simple query, so a failed statement is
     *  rolled back to the savepoint and the transaction goes on. */
    static void caseAutosave() throws Exception {
        try (Connection c = connect("autosave", "always")) {
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.executeUpdate("INSERT INTO drv_items VALUES (20, 'first')");
                try {
                    s.executeUpdate("INSERT INTO drv_items VALUES (20, 'duplicate')");
                    check(false, "duplicate key accepted");
                } catch (SQLException e) {
                    check("23505".equals(e.getSQLState()), "duplicate gave " + e.getSQLState());
                }
                s.executeUpdate("INSERT INTO drv_items VALUES (21, 'after the failure')");
            }
            c.commit();
            check(countOnPrimary(c, 20, 21) == 2, "rows of the saved transaction missing");
        }
    }

    static void caseCopy() throws Exception {
        try (Connection c = connect()) {
            CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder in = new StringBuilder();
            for (int i = 100; i < 600; i++) {
                in.append(i).append("\tcopied ").append(i).append('\n');
            }
            long n = copy.copyIn("COPY drv_items (id, name) FROM STDIN", new StringReader(in.toString()));
            check(n == 500, "copyIn reported " + n + " rows");
            // In a read-write transaction, so the primary answers: a replica may lag.
            c.setAutoCommit(false);
            StringWriter out = new StringWriter();
            n = copy.copyOut("COPY (SELECT id, name FROM drv_items WHERE id BETWEEN 100 AND 599 ORDER BY id) TO STDOUT", out);
            c.commit();
            check(n == 500, "copyOut reported " + n + " rows");
            String[] lines = out.toString().split("\n");
            check(lines.length == 500, "copyOut returned " + lines.length + " lines");
            check(lines[0].equals("100\tcopied 100") && lines[499].equals("599\tcopied 599"), "row contents");
        }
    }

    static void caseListenNotify() throws Exception {
        try (Connection listener = connect(); Connection sender = connect()) {
            try (Statement s = listener.createStatement()) {
                s.execute("LISTEN drv_channel");
            }
            try (Statement s = sender.createStatement()) {
                s.execute("NOTIFY drv_channel, 'hello'");
            }
            PGNotification[] got = listener.unwrap(PGConnection.class).getNotifications(5000);
            check(got != null && got.length == 1, "no notification within 5 s");
            check("drv_channel".equals(got[0].getName()) && "hello".equals(got[0].getParameter()),
                "got " + got[0].getName() + " " + got[0].getParameter());
        }
    }

    static void caseCancel() throws Exception {
        try (Connection c = connect(); Statement s = c.createStatement()) {
            // Statement.cancel() opens a new connection to the same host and port (the proxy)
            // and sends a CancelRequest with the BackendKeyData the proxy gave. A cancel that
            // arrives before the query reaches a backend cancels nothing, and nothing says
            // "running", so keep cancelling until the query ends.
            AtomicBoolean done = new AtomicBoolean();
            Thread canceller = new Thread(() -> {
                while (!done.get()) {
                    try {
                        Thread.sleep(300);
                        if (!done.get()) {
                            s.cancel();
                        }
                    } catch (InterruptedException | SQLException e) {
                        return;
                    }
                }
            });
            canceller.setDaemon(true);
            long t0 = System.nanoTime();
            canceller.start();
            try {
                s.execute("SELECT pg_sleep(10)");
                throw new AssertionError("pg_sleep(10) completed without being cancelled");
            } catch (SQLException e) {
                check("57014".equals(e.getSQLState()), "expected SQLSTATE 57014, got " + e.getSQLState() + ": " + e.getMessage());
            } finally {
                done.set(true);
                canceller.join();
            }
            double elapsed = (System.nanoTime() - t0) / 1e9;
            check(elapsed < 5, String.format("cancel took %.1f s", elapsed));
            check(Integer.valueOf(9).equals(one(c, "SELECT 9")), "connection unusable after cancel");
        }
    }

    static void caseReplicaRead() throws Exception {
        // Right after login pgjdbc runs `SET extra_float_digits = 3` and `SET application_name =
        // 'PostgreSQL JDBC Driver'`, unless assumeMinServerVersion >= 9.0, which makes it send
        // both as startup parameters instead. Both ways must leave reads free to go to a
        // replica; a failure names which.
        StringBuilder problems = new StringBuilder();
        for (String assume : new String[] {null, "9.0"}) {
            String how = assume == null ? "default connection (SETs after login)" : "assumeMinServerVersion=" + assume;
            try (Connection c = assume == null ? connect() : connect("assumeMinServerVersion", assume)) {
                // JDBC connections start in autocommit mode: this read is outside any
                // transaction, so it may go to a replica.
                check(c.getAutoCommit(), "not in autocommit mode");
                Object port = one(c, "SELECT inet_server_port()");
                if (Integer.valueOf(primaryPort).equals(port)) {
                    problems.append(how).append(": autocommit read ran on the primary (").append(port).append("); ");
                }
                // With autocommit off pgjdbc sends BEGIN first; a transaction that is not
                // declared read-only may write at any point, so the proxy runs all of it on the
                // primary.
                c.setAutoCommit(false);
                port = one(c, "SELECT inet_server_port()");
                c.commit();
                if (!Integer.valueOf(primaryPort).equals(port)) {
                    problems.append(how).append(": a read-write transaction ran on ").append(port).append("; ");
                }
                // setReadOnly(true) (Spring's @Transactional(readOnly = true)) makes pgjdbc open
                // the transaction with BEGIN READ ONLY, sent through the extended protocol in the
                // same batch as the first query: the whole transaction may run on a replica.
                c.setReadOnly(true);
                port = one(c, "SELECT inet_server_port()");
                Object again = one(c, "SELECT inet_server_port()");
                c.commit();
                c.setReadOnly(false);
                if (Integer.valueOf(primaryPort).equals(port)) {
                    problems.append(how).append(": a read-only transaction ran on the primary; ");
                }
                if (!port.equals(again)) {
                    problems.append(how).append(": a read-only transaction moved from ").append(port)
                        .append(" to ").append(again).append("; ");
                }
            }
        }
        check(problems.length() == 0, problems.toString());
    }

    public static void main(String[] args) throws Exception {
        url = args[0];
        primaryPort = Integer.parseInt(args[1]);
        Map<String, Case> cases = new LinkedHashMap<>();
        cases.put("connect", PgjdbcDriver::caseConnect);
        cases.put("simple_query", PgjdbcDriver::caseSimpleQuery);
        cases.put("parameterized_query", PgjdbcDriver::caseParameterizedQuery);
        cases.put("prepared_reuse", PgjdbcDriver::casePreparedReuse);
        cases.put("transaction", PgjdbcDriver::caseTransaction);
        cases.put("error_recovery", PgjdbcDriver::caseErrorRecovery);
        cases.put("autosave", PgjdbcDriver::caseAutosave);
        cases.put("copy", PgjdbcDriver::caseCopy);
        cases.put("listen_notify", PgjdbcDriver::caseListenNotify);
        cases.put("cancel", PgjdbcDriver::caseCancel);
        cases.put("replica_read", PgjdbcDriver::caseReplicaRead);

        // Daemon threads: a hung case is reported and abandoned, not waited for at exit.
        ThreadFactory daemons = r -> {
            Thread t = new Thread(r);
            t.setDaemon(true);
            return t;
        };
        int failed = 0;
        for (Map.Entry<String, Case> e : cases.entrySet()) {
            ExecutorService one = Executors.newSingleThreadExecutor(daemons);
            Future<?> f = one.submit(() -> {
                e.getValue().run();
                return null;
            });
            String error = null;
            try {
                f.get(CASE_TIMEOUT_S, TimeUnit.SECONDS);
            } catch (TimeoutException te) {
                f.cancel(true);
                error = "timed out after " + CASE_TIMEOUT_S + " s";
            } catch (java.util.concurrent.ExecutionException ee) {
                Throwable t = ee.getCause();
                String state = t instanceof SQLException ? " [SQLSTATE " + ((SQLException) t).getSQLState() + "]" : "";
                error = t.getClass().getSimpleName() + state + ": " + t.getMessage();
            }
            one.shutdownNow();
            if (error == null) {
                System.out.println("ok " + DRIVER + " " + e.getKey());
            } else {
                failed++;
                System.out.println("FAIL " + DRIVER + " " + e.getKey() + ": " + error.replaceAll("\\s+", " "));
            }
            System.out.flush();
        }
        System.exit(failed == 0 ? 0 : 1);
    }
}
