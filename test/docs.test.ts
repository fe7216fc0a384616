/**
 * Documentation that CI keeps honest: every public export has TSDoc (TypeDoc with the project's
 * typedoc.json, warnings as errors), and the README's error table lists exactly the error codes
 * and classes of src/errors.ts.
 */

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as api from '../src/index.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const typedocBin = join(root, 'node_modules', 'typedoc', 'bin', 'typedoc');

/**
 * Runs TypeDoc in the repository root (so typedoc.json applies) without writing any output.
 * Type errors are tsc's job (`npm run typecheck`); skipping that check here halves the time.
 */
function typedoc(extraArgs: readonly string[]): Promise<{ code: number | null; output: string }> {
  const args = [typedocBin, '--emit', 'none', '--treatWarningsAsErrors', '--skipErrorChecking', ...extraArgs];
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.once('error', reject);
    // TypeDoc colours its messages.
    child.once('close', (code) => resolve({ code, output: output.replace(/\x1b\[[0-9;]*m/g, '') }));
  });
}

// The two TypeDoc runs are independent: run them side by side.
describe('TypeDoc', { concurrency: true }, () => {
  test('every export of qcow2-stream and qcow2-stream/transforms is documented (TypeDoc, warnings as errors)', async () => {
    const { code, output } = await typedoc([]);
    assert.equal(code, 0, `npm run docs would warn; fix the doc comments:\n${output}`);
  });

  test('the TypeDoc configuration does catch an undocumented export', async (t) => {
    // The check above is only worth something if typedoc.json really validates: try it on a fixture.
    const dir = mkdtempSync(join(tmpdir(), 'qcow2-stream-docs-'));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(join(dir, 'fixture.mts'), '/** Documented. */\nexport const documentedValue = 1;\nexport function undocumentedFunction(): number {\n  return 2;\n}\n');
    writeFileSync(
      join(dir, 'tsconfig.json'),
      JSON.stringify({ extends: join(root, 'tsconfig.json'), compilerOptions: { types: [], rootDir: '.' }, include: ['fixture.mts'] }),
    );
    const { code, output } = await typedoc(['--tsconfig', join(dir, 'tsconfig.json'), '--entryPoints', join(dir, 'fixture.mts')]);
    assert.notEqual(code, 0, output);
    assert.match(output, /undocumentedFunction .*does not have any documentation/);
    assert.doesNotMatch(output, /documentedValue .*does not have any documentation/);
  });
});

test("the README's error table lists every error code with its class, and nothing else", () => {
  const readme = readFileSync(join(root, 'README.md'), 'utf8');
  const section = readme.split('\n## Errors\n')[1]?.split('\n## ')[0] ?? '';
  const documented = [...section.matchAll(/^\| `(QCOW_ERR\w*)` \| (\w+) \|/gm)].map((m) => `${m[1]} ${m[2]}`).sort();

  // Every code the source spells out, with the exported class that carries it.
  const source = readFileSync(join(root, 'src', 'errors.ts'), 'utf8');
  const codes = new Set([...source.matchAll(/'(QCOW_ERR\w*)'/g)].map((m) => m[1]!));
  const classOf = new Map<string, string>([[new api.Qcow2StreamError('probe').code, 'Qcow2StreamError']]);
  for (const [name, value] of Object.entries(api)) {
    if (typeof value === 'function' && 'CODE' in value && typeof value.CODE === 'string') classOf.set(value.CODE, name);
  }
  assert.deepEqual([...codes].sort(), [...classOf.keys()].sort(), 'every code in src/errors.ts has an exported class');
  assert.deepEqual(documented, [...classOf].map(([code, name]) => `${code} ${name}`).sort());
});
