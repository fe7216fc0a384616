/**
 * The CLI surface a newcomer meets first: --version, --help for the program and every command,
 * usage errors, size suffixes, and the exit codes the README documents (0 ok, 1 differences or
 * findings, 2 error).
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { appendFileSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseSize } from '../../src/cli/common.js';
import { runCli, type CliResult } from '../helpers/cli.js';
import { mixedExtents, writeRawImage } from '../helpers/images.js';
import { tempDir } from '../helpers/qemu.js';
import { setRefcount16 } from '../read/fixtures.js';

const COMMANDS = ['convert', 'wrap', 'export', 'info', 'map', 'check', 'compare', 'measure'];
/** The fleet commands (src/cli/fleet.ts): no image argument, but the same help shape. */
const FLEET_COMMANDS = ['worker', 'enqueue', 'jobs'];
const packageJson = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };

/** A usage or runtime error: exit 2, one line naming the code, at most a hint line, no stack trace. */
function assertOneLineError(result: CliResult, message: RegExp, code = 'QCOW_ERR_INVALID_ARGUMENT'): void {
  assert.equal(result.code, 2, result.stderr);
  assert.equal(result.stdout, '');
  const [first, ...rest] = result.stderr.trimEnd().split('\n');
  assert.match(first ?? '', /^qcow2-stream: /);
  assert.match(first ?? '', message);
  assert.ok(first?.endsWith(` [${code}]`), `the error line ends with its code: ${first}`);
  assert.ok(rest.length <= 1 && rest.every((line) => line.startsWith('  hint: ')), `at most one hint line:\n${result.stderr}`);
  assert.doesNotMatch(result.stderr, /^\s+at /m, 'no stack trace');
}

test('--version and -V print the package.json version', () => {
  for (const flag of ['--version', '-V']) {
    const result = runCli([flag]);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout, `${packageJson.version}\n`);
  }
});

test('qcow2-stream --help lists every command and shows examples', () => {
  const result = runCli(['--help']);
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /^Usage: qcow2-stream \[options\] \[command\]\n/);
  const commandSection = result.stdout.split('\nCommands:\n')[1]?.split('\n\n')[0] ?? '';
  const listed = [...commandSection.matchAll(/^ {2}(\w+)\b/gm)].map((m) => m[1]);
  assert.deepEqual(listed, [...COMMANDS, ...FLEET_COMMANDS, 'help'], 'a new command needs a case in this file');
  assert.match(result.stdout, /\nExamples:\n {2}qcow2-stream convert /);
  assert.match(result.stdout, /Exit codes: 0 .*, 1 .*, 2 error/);
});

for (const command of COMMANDS) {
  test(`qcow2-stream ${command} --help: usage, options and an example`, () => {
    const result = runCli([command, '--help']);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stderr, '');
    assert.match(result.stdout, new RegExp(`^Usage: qcow2-stream ${command} \\[options\\] [<[]`));
    assert.match(result.stdout, /\nOptions:\n/);
    assert.match(result.stdout, /\nExamples?:\n/);
    assert.match(result.stdout, new RegExp(`\\n {2}qcow2-stream ${command} \\S`), 'an example line runs the command itself');
  });
}

for (const command of FLEET_COMMANDS) {
  test(`qcow2-stream ${command} --help: usage, --connection and an example`, () => {
    const result = runCli([command, '--help']);
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, new RegExp(`^Usage: qcow2-stream ${command} \\[options\\]`));
    assert.match(result.stdout, /--connection <url>/);
    assert.match(result.stdout, /\nExamples?:\n/);
    assert.match(result.stdout, new RegExp(`\\n {2}qcow2-stream ${command} \\S`), 'an example line runs the command itself');
  });
}

test('usage errors: one line with the code and a hint naming the right --help, exit 2', () => {
  const unknownCommand = runCli(['frobnicate', 'disk.raw']);
  assertOneLineError(unknownCommand, /unknown command 'frobnicate'/);
  assert.match(unknownCommand.stderr, /hint: run 'qcow2-stream --help' for usage/);

  const unknownOption = runCli(['info', '--frobnicate', 'disk.qcow2']);
  assertOneLineError(unknownOption, /unknown option '--frobnicate'/);
  assert.match(unknownOption.stderr, /hint: run 'qcow2-stream info --help' for usage/);

  // A bad value for an option with a parser (this one used to escape as a stack trace).
  assertOneLineError(runCli(['compare', '-f', 'vdi', 'a', 'b']), /Unknown image format 'vdi'/);
  assertOneLineError(runCli(['export', 'a.qcow2']), /missing required argument 'output'/);
  assertOneLineError(runCli(['check', 'a.qcow2', 'b.qcow2']), /too many arguments/);
});

test('parseSize: bytes, binary suffixes with or without B/iB, any case; everything else refused', () => {
  const valid: Array<[string, number]> = [
    ['0', 0],
    ['512', 512],
    ['512B', 512],
    ['64K', 65536],
    ['64k', 65536],
    ['64KiB', 65536],
    ['64KB', 65536],
    ['2M', 2 * 1024 ** 2],
    ['2MiB', 2 * 1024 ** 2],
    ['20G', 20 * 1024 ** 3],
    ['20GiB', 20 * 1024 ** 3],
    ['1.5G', 1.5 * 1024 ** 3],
    ['1T', 1024 ** 4],
    ['1.5T', 1.5 * 1024 ** 4],
    [' 4 KiB ', 4096],
  ];
  for (const [text, bytes] of valid) assert.equal(parseSize(text), bytes, text);
  for (const text of ['', 'G', '1.5.G', '-1', '12X', '1e6', '0x100', '4iB', '64 K B', '1.3', '0.1K', '9E', 'lots']) {
    assert.throws(() => parseSize(text), { code: 'commander.invalidArgument' }, `'${text}' is refused`);
  }
});

test('sizes through the CLI: --cluster-size 64K, 64KiB and 65536 write the same image; bad sizes exit 2 and create nothing', (t) => {
  const dir = tempDir(t);
  const size = 1024 * 1024 + 4096;
  writeRawImage(join(dir, 'in.raw'), size, mixedExtents(size, 65536, 5));
  const images = ['64K', '64KiB', '65536'].map((clusterSize, i) => {
    const result = runCli(['convert', 'in.raw', `c${i}.qcow2`, '--data-file', `c${i}.data`, '--data-file-name', 'disk.data', '--cluster-size', clusterSize, '--size', '1028K', '--json'], { cwd: dir });
    assert.equal(result.code, 0, result.stderr);
    assert.equal((JSON.parse(result.stdout) as { clusterSize: number }).clusterSize, 65536);
    return readFileSync(join(dir, `c${i}.qcow2`));
  });
  assert.ok(images[0]!.equals(images[1]!) && images[0]!.equals(images[2]!), 'the three spellings give byte-identical metadata');

  const before = readdirSync(dir).sort();
  for (const [option, value] of [['--cluster-size', '1.5.G'], ['--cluster-size', '-1'], ['--cluster-size', '12X'], ['--size', '1.5.G']] as const) {
    assertOneLineError(runCli(['convert', 'in.raw', 'bad.qcow2', option, value], { cwd: dir }), new RegExp(`'${value.replace('.', '\\.')}' is not a size`));
  }
  assertOneLineError(runCli(['wrap', 'in.raw', 'bad.qcow2', '--cluster-size', '12X'], { cwd: dir }), /'12X' is not a size/);
  assert.deepEqual(readdirSync(dir).sort(), before, 'nothing created');
});

test('exit codes without qemu: compare 0 same / 1 different, check 0 clean / 1 leak, errors 2', (t) => {
  const dir = tempDir(t);
  const size = 512 * 1024;
  writeRawImage(join(dir, 'a.raw'), size, mixedExtents(size, 65536, 9));
  const changed = readFileSync(join(dir, 'a.raw'));
  changed[200_000] = (changed[200_000] ?? 0) ^ 0xff;
  writeFileSync(join(dir, 'b.raw'), changed);
  assert.equal(runCli(['convert', 'a.raw', 'a.qcow2', '-q'], { cwd: dir }).code, 0);

  const same = runCli(['compare', 'a.raw', 'a.qcow2'], { cwd: dir });
  assert.equal(same.code, 0, same.stderr);
  const different = runCli(['compare', 'a.qcow2', 'b.raw', '--json'], { cwd: dir });
  assert.equal(different.code, 1, different.stderr);
  assert.deepEqual(JSON.parse(different.stdout), { identical: false, 'size-mismatch': false, 'mismatch-offset': Math.floor(200_000 / 512) * 512 });

  const clean = runCli(['check', 'a.qcow2'], { cwd: dir });
  assert.equal(clean.code, 0, clean.stdout);
  // A refcount on a cluster nothing references: a leak (space wasted, data safe) is still exit 1.
  appendFileSync(join(dir, 'a.qcow2'), Buffer.alloc(65536));
  setRefcount16(join(dir, 'a.qcow2'), statSync(join(dir, 'a.qcow2')).size / 65536 - 1, 1);
  const leaked = runCli(['check', '--json', 'a.qcow2'], { cwd: dir });
  assert.equal(leaked.code, 1, leaked.stderr);
  const report = JSON.parse(leaked.stdout) as { leaks: number; corruptions: number; findings: Array<{ severity: string }> };
  assert.deepEqual([report.leaks, report.corruptions, report.findings.map((f) => f.severity)], [1, 0, ['leak']]);

  assertOneLineError(runCli(['compare', 'a.raw', 'missing.raw'], { cwd: dir }), /missing\.raw/, 'QCOW_ERR_FILE');
  assertOneLineError(runCli(['check', 'a.raw'], { cwd: dir }), /does not support checks/, 'QCOW_ERR_UNSUPPORTED_FEATURE');
  assertOneLineError(runCli(['check', '-f', 'qcow2', 'a.raw'], { cwd: dir }), /./, 'QCOW_ERR_BAD_MAGIC');
});
