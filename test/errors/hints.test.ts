/**
 * Errors of the API speak to API callers too: wherever a message or hint names a CLI option
 * (`--force`), it also names the API form (`overwrite: true`), as the path policy's hints do.
 * Checked on real refusals, and over every string in src/ outside the CLI so new ones follow.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import { convert, isQcow2StreamError } from '../../src/index.js';
import { writeRawImage } from '../helpers/images.js';
import { tempDir } from '../helpers/qemu.js';

const root = fileURLToPath(new URL('../..', import.meta.url));

async function hintOf(work: Promise<unknown>, code: string): Promise<string> {
  const err = await work.then(() => undefined, (e: unknown) => e);
  assert.ok(isQcow2StreamError(err), String(err));
  assert.equal(err.code, code, err.message);
  assert.ok(err.hint, `${err.code} has a hint`);
  return err.hint;
}

test('real refusals: each hint names the CLI option and the API option', async (t) => {
  const dir = tempDir(t);
  const raw = join(dir, 'disk.raw');
  writeRawImage(raw, 1 << 20, [{ offset: 0, length: 65536, kind: 'random' }]);
  const output = join(dir, 'out.qcow2');

  const dedup = await hintOf(convert({ input: raw, output, dedup: true }), 'QCOW_ERR_DEDUP_UNSUPPORTED');
  assert.match(dedup, /--internal --dedup \(API: layout: 'internal', dedup: true\)/);

  const compression = await hintOf(convert({ input: raw, output, compression: 'zlib' }), 'QCOW_ERR_COMPRESSION_UNSUPPORTED');
  assert.match(compression, /--internal \(API: layout: 'internal'\)/);

  writeFileSync(output, 'an earlier image');
  const exists = await hintOf(convert({ input: raw, output }), 'QCOW_ERR_FILE');
  assert.match(exists, /--force \(overwrite: true in the API\)|--force \(API: overwrite: true\)/);

  const size = await hintOf(convert({ input: raw, output: join(dir, 'sized.qcow2'), size: 4096 }), 'QCOW_ERR_INPUT_SIZE');
  assert.match(size, /--size.*`size` in the API|--size \(API: size\)/);
});

/** Every string literal piece (plain, template head/middle/tail) of a source file. */
function literals(file: ts.SourceFile): ts.Node[] {
  const out: ts.Node[] = [];
  const visit = (node: ts.Node) => {
    if (ts.isStringLiteral(node) || ts.isNoSubstitutionTemplateLiteral(node) || ts.isTemplateHead(node) || ts.isTemplateMiddle(node) || ts.isTemplateTail(node)) out.push(node);
    ts.forEachChild(node, visit);
  };
  visit(file);
  return out;
}

/** The statement a node belongs to (a message and its hint are one `throw` statement). */
function statementOf(node: ts.Node): ts.Node {
  let at: ts.Node = node;
  while (at.parent && !ts.isSourceFile(at.parent) && !ts.isBlock(at.parent) && !ts.isCaseClause(at.parent)) at = at.parent;
  return at;
}

/** Strings that name CLI options for the CLI's own sake (a job payload is a command line), or are not our options. */
const CLI_ONLY = [
  { file: 'src/io/path-policy.ts', text: "'--data-file'" }, // hintFor() adds "(API: …)" to the message it builds
  { file: 'src/fleet/job.ts', text: '--help?' },
  // V8 flags the compression pool toggles, not options of ours.
  { file: 'src/write/compress.ts', text: "'--expose-gc'" },
  { file: 'src/write/compress.ts', text: "'--no-expose-gc'" },
];

test('no string in src/ outside the CLI names a --option without its API form', () => {
  const files: string[] = [];
  const walk = (dir: string) => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) {
        if (entry.name !== 'cli' && entry.name !== 'native') walk(path);
      } else if (entry.name.endsWith('.ts')) files.push(path);
    }
  };
  walk(join(root, 'src'));
  walk(join(root, 'transforms'));
  const offenders: string[] = [];
  for (const path of files) {
    const name = relative(root, path);
    const source = ts.createSourceFile(path, readFileSync(path, 'utf8'), ts.ScriptTarget.ES2022, true);
    for (const literal of literals(source)) {
      if (!/(^|[\s('"`])--[a-z]/.test(literal.getText())) continue;
      const statement = statementOf(literal).getText();
      if (statement.includes('API')) continue;
      if (CLI_ONLY.some((allowed) => allowed.file === name && statement.includes(allowed.text))) continue;
      offenders.push(`${name}:${source.getLineAndCharacterOfPosition(literal.getStart()).line + 1}: ${literal.getText()}`);
    }
  }
  assert.deepEqual(offenders, []);
});
