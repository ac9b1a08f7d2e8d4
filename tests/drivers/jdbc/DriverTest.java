// pgjdbc through pgnear: the driver compatibility scenario (see tests/drivers.rs).
//
// Environment: PGNEAR_URL (through pgnear, TLS verify-full, SCRAM), DIRECT_URL (the primary,
// no pgnear), PGNEAR_REGION (the region of that pgnear), as libpq URLs; they are turned into
// JDBC URLs here. Exits non-zero with a message on failure.
//
// pgjdbc speaks the extended protocol for everything (preferQueryMode=extended, its default):
// unnamed statements at first, a named server-side statement once a PreparedStatement has run
// prepareThreshold (5) times, and binary results for it from then on.

import java.io.StringReader;
import java.io.StringWriter;
import java.lang.reflect.Field;
import java.net.Socket;
import java.net.URI;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicReference;
import javax.net.ssl.SSLSocket;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;
import org.postgresql.core.BaseConnection;
import org.postgresql.core.PGStream;
import org.postgresql.core.QueryExecutorBase;

public class DriverTest {
    static final String T = "drv_jdbc";
    static String region;
    static String typesSql;
    static String pgnearUrl;
    static String directUrl;
    static Properties pgnearProps;
    static Properties directProps;

    interface Step {
        String run(Connection c) throws Exception;
    }

    static void check(boolean cond, String what) {
        if (!cond) throw new AssertionError(what);
    }

    /** A libpq URL as a JDBC URL and its user and password. */
    static String jdbcUrl(String url, Properties props) throws Exception {
        URI u = new URI(url);
        String[] userInfo = u.getRawUserInfo().split(":", 2);
        props.setProperty("user", URLDecoder.decode(userInfo[0], StandardCharsets.UTF_8));
        props.setProperty("password", URLDecoder.decode(userInfo[1], StandardCharsets.UTF_8));
        return "jdbc:postgresql://" + u.getHost() + ":" + u.getPort() + u.getRawPath() + "?" + u.getRawQuery();
    }

    static Connection connect(String url, Properties props) throws SQLException {
        return DriverManager.getConnection(url, props);
    }

    static Object value(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(sql)) {
            check(r.next(), "a row from " + sql);
            return r.getObject(1);
        }
    }

    static boolean onReplica(Connection c) throws SQLException {
        return (Boolean) value(c, "SELECT pg_is_in_recovery()");
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement()) {
            s.execute(sql);
        }
    }

    static String tlsAndScram(Connection c) throws Exception {
        BaseConnection base = c.unwrap(BaseConnection.class);
        Field f = QueryExecutorBase.class.getDeclaredField("pgStream");
        f.setAccessible(true);
        Socket socket = ((PGStream) f.get(base.getQueryExecutor())).getSocket();
        check(socket instanceof SSLSocket, "the connection uses TLS: " + socket);
        String proto = ((SSLSocket) socket).getSession().getProtocol();
        check(proto.equals("TLSv1.2") || proto.equals("TLSv1.3"), "TLS protocol " + proto);
        Properties bad = new Properties();
        bad.putAll(pgnearProps);
        bad.setProperty("password", "wrong");
        try {
            connect(pgnearUrl, bad).close();
            throw new AssertionError("a wrong password was accepted");
        } catch (SQLException e) {
            check("28P01".equals(e.getSQLState()), "wrong password: " + e.getSQLState() + " " + e);
        }
        return proto;
    }

    static String routing(Connection c) throws Exception {
        check(onReplica(c), "a read runs on the replica");
        exec(c, "DROP TABLE IF EXISTS " + T);
        exec(c, "CREATE TABLE " + T + " (id int PRIMARY KEY, name text)");
        check(!(Boolean) value(c, "INSERT INTO " + T + " VALUES (0, 'zero') RETURNING pg_is_in_recovery()"),
            "a write runs on the primary");
        // The causal token, as ParameterStatus after each committed write.
        String before = c.unwrap(PGConnection.class).getParameterStatus("pgnear.write_lsn");
        exec(c, "UPDATE " + T + " SET name = 'one' WHERE id = 0");
        String after = c.unwrap(PGConnection.class).getParameterStatus("pgnear.write_lsn");
        check(after != null && after.matches("[0-9A-F]+/[0-9A-F]+") && !after.equals(before),
            "ParameterStatus pgnear.write_lsn: " + before + " then " + after);
        // pgnear answers its in-band commands in the simple protocol, which pgjdbc speaks with
        // preferQueryMode=simple.
        Properties simple = new Properties();
        simple.putAll(pgnearProps);
        simple.setProperty("preferQueryMode", "simple");
        try (Connection s = connect(pgnearUrl, simple)) {
            check(region.equals(value(s, "SHOW pgnear.region")), "SHOW pgnear.region");
            exec(s, "SET pgnear.route = 'primary'");
            check(!onReplica(s), "SET pgnear.route = 'primary' pins to the primary");
            exec(s, "SET pgnear.route = 'auto'");
            check(onReplica(s), "SET pgnear.route = 'auto' releases the pin");
            exec(s, "UPDATE " + T + " SET name = 'two' WHERE id = 0");
            String lsn = (String) value(s, "SHOW pgnear.write_lsn");
            check(lsn.equals(s.unwrap(PGConnection.class).getParameterStatus("pgnear.write_lsn")),
                "SHOW pgnear.write_lsn " + lsn + " == ParameterStatus");
        }
        return null;
    }

    static String prepared(Connection c) throws Exception {
        try (PreparedStatement ins = c.prepareStatement(
                "INSERT INTO " + T + " VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name");
             PreparedStatement sel = c.prepareStatement(
                "SELECT pg_is_in_recovery(), name FROM " + T + " WHERE id = ?")) {
            for (int i = 1; i <= 30; i++) {
                ins.setInt(1, 1000 + i);
                ins.setString(2, "p" + i);
                check(ins.executeUpdate() == 1, "upsert " + i);
                sel.setInt(1, 1000 + i);
                try (ResultSet r = sel.executeQuery()) {
                    check(r.next(), "prepared read " + i + " returns a row");
                    check(r.getBoolean(1), "prepared read " + i + " runs on the replica");
                    check(("p" + i).equals(r.getString(2)), "prepared read " + i + " sees its write: " + r.getString(2));
                }
            }
        }
        long n = (Long) value(c, "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'S\\_%'");
        check(n >= 1, "pgjdbc's named statements exist on the replica (" + n + ")");
        // A batch: many Bind/Execute in one round trip.
        try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + T + " VALUES (?, ?)")) {
            for (int i = 0; i < 50; i++) {
                ins.setInt(1, 1100 + i);
                ins.setString(2, "b" + i);
                ins.addBatch();
            }
            int[] counts = ins.executeBatch();
            check(counts.length == 50, "batch counts");
        }
        check((Long) value(c, "SELECT count(*) FROM " + T + " WHERE id >= 1100 AND id < 1150") == 50, "batch rows");
        return null;
    }

    static String transaction(Connection c) throws Exception {
        c.setAutoCommit(false);
        check(!onReplica(c), "a read in a read-write transaction runs on the primary");
        exec(c, "INSERT INTO " + T + " VALUES (2000, 'tx')");
        check((Long) value(c, "SELECT count(*) FROM " + T + " WHERE id = 2000") == 1, "own write in tx");
        c.commit();
        c.setAutoCommit(true);
        check(onReplica(c), "after the commit, reads are on the replica");
        check("tx".equals(value(c, "SELECT name FROM " + T + " WHERE id = 2000")), "the committed row");
        c.setAutoCommit(false);
        exec(c, "INSERT INTO " + T + " VALUES (2001, 'rolled back')");
        c.rollback();
        c.setAutoCommit(true);
        check((Long) value(c, "SELECT count(*) FROM " + T + " WHERE id = 2001") == 0, "rollback");
        c.setAutoCommit(false);
        try {
            exec(c, "INSERT INTO " + T + " VALUES (2000, 'duplicate')");
            throw new AssertionError("a duplicate key was accepted");
        } catch (SQLException e) {
            check("23505".equals(e.getSQLState()), "duplicate: " + e.getSQLState());
        }
        c.rollback();
        // setReadOnly: pgjdbc begins its transactions READ ONLY, which run on the replica.
        c.setReadOnly(true);
        check(onReplica(c), "a read-only transaction runs on the replica");
        c.commit();
        c.setReadOnly(false);
        c.setAutoCommit(true);
        return null;
    }

    static String readYourWrites(Connection c) throws Exception {
        try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + T + " VALUES (?, ?)");
             PreparedStatement sel = c.prepareStatement("SELECT name FROM " + T + " WHERE id = ?")) {
            for (int i = 0; i < 100; i++) {
                ins.setInt(1, 3000 + i);
                ins.setString(2, "ryw" + i);
                ins.executeUpdate();
                sel.setInt(1, 3000 + i);
                try (ResultSet r = sel.executeQuery()) {
                    check(r.next() && ("ryw" + i).equals(r.getString(1)), "read-your-writes " + i);
                }
            }
        }
        return null;
    }

    static String listenNotify(Connection c) throws Exception {
        try (Connection listener = connect(pgnearUrl, pgnearProps)) {
            exec(listener, "LISTEN drv_jdbc");
            check(!onReplica(listener), "LISTEN pins the session to the primary");
            exec(c, "NOTIFY drv_jdbc, 'one'");
            exec(c, "SELECT pg_notify('drv_jdbc', 'two')");
            PGConnection pg = listener.unwrap(PGConnection.class);
            List<String> got = new ArrayList<>();
            for (int i = 0; i < 60 && got.size() < 2; i++) {
                PGNotification[] ns = pg.getNotifications(500);
                if (ns != null) for (PGNotification n : ns) got.add(n.getName() + ":" + n.getParameter());
            }
            check(got.equals(List.of("drv_jdbc:one", "drv_jdbc:two")), "notifications: " + got);
            exec(listener, "UNLISTEN *");
            check(onReplica(listener), "UNLISTEN * releases the pin");
        }
        return null;
    }

    static String copy(Connection c) throws Exception {
        exec(c, "DROP TABLE IF EXISTS " + T + "_copy");
        exec(c, "CREATE TABLE " + T + "_copy (id int, name text)");
        StringBuilder in = new StringBuilder();
        for (int i = 0; i < 1000; i++) in.append(i).append("\trow ").append(i).append('\n');
        CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
        long n = cm.copyIn("COPY " + T + "_copy (id, name) FROM STDIN", new StringReader(in.toString()));
        check(n == 1000, "COPY FROM rows: " + n);
        check((Long) value(c, "SELECT count(*) FROM " + T + "_copy") == 1000 && onReplica(c),
            "the copied rows, read back on the replica");
        StringWriter out = new StringWriter();
        n = cm.copyOut("COPY (SELECT id, name FROM " + T + "_copy ORDER BY id) TO STDOUT", out);
        check(n == 1000 && out.toString().equals(in.toString()), "COPY TO returns what COPY FROM wrote");
        return null;
    }

    static String cancel(Connection c) throws Exception {
        AtomicReference<Throwable> outcome = new AtomicReference<>();
        AtomicBoolean done = new AtomicBoolean();
        try (Statement s = c.createStatement()) {
            Thread canceller = new Thread(() -> {
                // A cancel that arrives before the query starts is lost: send it until it ends.
                while (!done.get()) {
                    try {
                        Thread.sleep(300);
                        if (!done.get()) s.cancel();
                    } catch (Exception e) {
                        outcome.compareAndSet(null, e);
                    }
                }
            });
            canceller.start();
            try {
                s.executeQuery("SELECT pg_sleep(60)");
                throw new AssertionError("pg_sleep(60) finished: the cancel did not reach it");
            } catch (SQLException e) {
                check("57014".equals(e.getSQLState()), "cancel: " + e.getSQLState() + " " + e);
            } finally {
                done.set(true);
                canceller.join();
            }
            check(outcome.get() == null, "Statement.cancel threw " + outcome.get());
        }
        // setQueryTimeout: pgjdbc's own timer sends the cancel.
        try (Statement s = c.createStatement()) {
            s.setQueryTimeout(1);
            s.executeQuery("SELECT pg_sleep(60)");
            throw new AssertionError("setQueryTimeout did not cancel pg_sleep(60)");
        } catch (SQLException e) {
            check("57014".equals(e.getSQLState()), "query timeout: " + e.getSQLState() + " " + e);
        }
        check(onReplica(c), "the session works after the cancels");
        return null;
    }

    /** Every column of every row as pgjdbc's getString, and the column type names. */
    static List<List<String>> rows(ResultSet r) throws SQLException {
        List<List<String>> out = new ArrayList<>();
        ResultSetMetaData md = r.getMetaData();
        List<String> types = new ArrayList<>();
        for (int i = 1; i <= md.getColumnCount(); i++) types.add(md.getColumnTypeName(i));
        out.add(types);
        while (r.next()) {
            List<String> row = new ArrayList<>();
            for (int i = 1; i <= md.getColumnCount(); i++) {
                Object o = r.getObject(i);
                row.add(o instanceof byte[] ? java.util.HexFormat.of().formatHex((byte[]) o) : r.getString(i));
            }
            out.add(row);
        }
        return out;
    }

    static List<List<String>> textResults(Connection c) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(typesSql)) {
            return rows(r);
        }
    }

    /** Past prepareThreshold pgjdbc asks for binary results of a named statement. */
    static List<List<String>> binaryResults(Connection c) throws SQLException {
        try (PreparedStatement ps = c.prepareStatement(typesSql)) {
            List<List<String>> last = null;
            for (int i = 0; i < 8; i++) {
                try (ResultSet r = ps.executeQuery()) {
                    last = rows(r);
                }
            }
            return last;
        }
    }

    static String types(Connection c) throws Exception {
        try (Connection direct = connect(directUrl, directProps)) {
            check(!onReplica(direct), "the direct URL is the primary");
            List<List<String>> a = textResults(c), b = textResults(direct);
            check(a.size() == 21, "20 rows");
            check(a.equals(b), "text results through pgnear " + a + " == direct " + b);
            a = binaryResults(c);
            b = binaryResults(direct);
            check(a.equals(b), "binary results through pgnear " + a + " == direct " + b);
        }
        return null;
    }

    public static void main(String[] args) throws Exception {
        region = System.getenv("PGNEAR_REGION");
        typesSql = Files.readString(Path.of("types.sql"));
        pgnearProps = new Properties();
        pgnearUrl = jdbcUrl(System.getenv("PGNEAR_URL"), pgnearProps);
        directProps = new Properties();
        directUrl = jdbcUrl(System.getenv("DIRECT_URL"), directProps);
        System.out.println("driver: pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION
            + " (Java " + System.getProperty("java.version") + ")");
        Object[][] steps = {
            {"SCRAM + TLS", (Step) DriverTest::tlsAndScram},
            {"routing and in-band commands", (Step) DriverTest::routing},
            {"prepared statements", (Step) DriverTest::prepared},
            {"transactions", (Step) DriverTest::transaction},
            {"read-your-writes", (Step) DriverTest::readYourWrites},
            {"LISTEN/NOTIFY", (Step) DriverTest::listenNotify},
            {"COPY", (Step) DriverTest::copy},
            {"cancel", (Step) DriverTest::cancel},
            {"text and binary results", (Step) DriverTest::types},
        };
        List<String> failed = new ArrayList<>();
        Connection c = connect(pgnearUrl, pgnearProps);
        for (Object[] step : steps) {
            String name = (String) step[0];
            try {
                String extra = ((Step) step[1]).run(c);
                System.out.println("ok: " + name + (extra != null ? " (" + extra + ")" : ""));
            } catch (Throwable e) {
                e.printStackTrace(System.out);
                System.out.println("FAIL: pgjdbc: " + name + ": " + e);
                failed.add(name);
                try {
                    c.close();
                } catch (SQLException ignored) {
                    // the next steps get a fresh connection either way
                }
                c = connect(pgnearUrl, pgnearProps);
            }
        }
        c.close();
        if (!failed.isEmpty()) {
            System.out.println("pgjdbc: " + failed.size() + " step(s) failed: " + String.join(", ", failed));
            System.exit(1);
        }
        System.out.println("pgjdbc: all steps passed");
    }
}
