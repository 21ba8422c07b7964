// Validates AsyncAPI documents with the AsyncAPI parser (what `asyncapi validate` runs):
// prints one JSON line per document with its error-level diagnostics; exit 1 if any.
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const parser = new Parser();
let failed = false;
for (const path of process.argv.slice(2)) {
  const { diagnostics } = await parser.parse(readFileSync(path, "utf8"));
  // Severity 0 is an error (1 warning, 2 info, 3 hint).
  const errors = diagnostics.filter((d) => d.severity === 0).map((d) => `${d.code}: ${d.message} at ${d.path.join(".")}`);
  const warnings = diagnostics.filter((d) => d.severity === 1).map((d) => `${d.code}: ${d.message}`);
  console.log(JSON.stringify({ path, errors, warnings }));
  failed ||= errors.length > 0;
}
process.exit(failed ? 1 : 0);
