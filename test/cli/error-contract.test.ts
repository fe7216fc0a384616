/**
 * The CLI's error contract: a failed command writes exactly one error line
 * (`qcow2-stream: MESSAGE [QCOW_ERR_…]`) and at most one `  hint:` line to standard error,
 * nothing else — warnings raised during a run that then fails are not printed (the error
 * says what matters), and a run that succeeds prints them after its work.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runCli } from '../helpers/cli.js';
import { needQemu, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';

const CONTRACT = /^qcow2-stream: [^\n]+ \[QCOW_ERR(_[A-Z_]+)?\]\n(  hint: [^\n]+\n)?$/;

test('every failure: one error line with its code, at most one hint line', (t) => {
  if (!needQemu(t)) return;
  const dir = tempDir(t);
  writeFileSync(join(dir, 'in.raw'), Buffer.alloc(128 * 1024, 7));
  qemuImg(['create', '-f', 'qcow2', '-o', 'data_file=short.data', 'short.qcow2', '1M'], dir);
  qemuIo(['-c', 'write -P 1 0 1M', 'short.qcow2'], dir);
  truncateSync(join(dir, 'short.data'), 64 * 1024); // reading it warns: the data file is short
  mkdirSync(join(dir, 'exists'));
  writeFileSync(join(dir, 'taken.raw'), 'x');
  writeFileSync(join(dir, 'junk.qcow2'), Buffer.concat([Buffer.from('QFI\xfb', 'latin1'), Buffer.alloc(100, 0xff)]));
  const failures: string[][] = [
    ['export', 'short.qcow2', '/dev/full'], // warns while reading, then fails writing (ENOSPC)
    ['export', 'short.qcow2', 'taken.raw'],
    ['export', 'short.qcow2', 'exists'],
    ['export', 'missing.qcow2', 'o.raw'],
    ['export', 'junk.qcow2', 'o.raw'],
    ['convert', 'in.raw', ''],
    ['convert', 'missing.raw', 'o.qcow2'],
    ['convert', 'in.raw', 'o.qcow2', '--size', '5'],
    ['convert', 'in.raw', 'o.qcow2', '--cluster-size', '3'],
    ['map', 'junk.qcow2'],
    ['info', 'missing.qcow2'],
    ['check', 'junk.qcow2'],
    ['compare', 'short.qcow2', 'missing.raw'],
    ['wrap', 'missing.raw', 'w.qcow2'],
    ['nosuchcommand'],
    ['export', '--nosuchoption', 'a', 'b'],
  ];
  for (const args of failures) {
    const result = runCli(args, { cwd: dir });
    assert.notEqual(result.code, 0, `${args.join(' ')} succeeded`);
    assert.match(result.stderr, CONTRACT, `${args.join(' ')}:\n${result.stderr}`);
  }
  // The same warning on a run that succeeds is printed, once.
  const ok = runCli(['export', '-q', 'short.qcow2', 'fine.raw'], { cwd: dir });
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(ok.stderr.match(/qcow2-stream: warning: .*short\.data/g)?.length, 1, ok.stderr);
});
