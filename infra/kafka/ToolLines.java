// Runs a Kafka tool's main once per line of stdin in one JVM (kafka.sh
// tool-lines): the arguments given first, then the line split on blanks.
// A JVM start per line costs seconds; `esk acls --commands` prints about 30.
// The tool ends the JVM with its own exit code when a line fails.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.lang.reflect.Method;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

public class ToolLines {
    public static void main(String[] args) throws Exception {
        Method main = Class.forName(args[0]).getMethod("main", String[].class);
        List<String> fixed = Arrays.asList(args).subList(1, args.length);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        int n = 0;
        for (String line; (line = in.readLine()) != null; ) {
            line = line.strip();
            if (line.isEmpty() || line.startsWith("#")) {
                continue;
            }
            List<String> all = new ArrayList<>(fixed);
            all.addAll(Arrays.asList(line.split("\\s+")));
            main.invoke(null, (Object) all.toArray(new String[0]));
            n++;
        }
        System.err.println("tool-lines: " + n + " lines run");
    }
}
