/**
 * qemu-img and qemu-io as oracles. Tests that need them call `needQemu(t)` and skip with a
 * clear message where they are missing (CI installs qemu-utils, so there they always run).
 */

import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, isAbsolute, join } from 'node:path';
import type { TestContext } from 'node:test';

function onPath(name: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' }).status === 0;
}

export const hasQemuImg = onPath('qemu-img');
export const hasQemuIo = onPath('qemu-io');

/** Skips the test (returns false) when qemu-img is not installed. */
export function needQemu(t: TestContext): boolean {
  if (hasQemuImg) return true;
  t.skip('qemu-img not installed (apt-get install qemu-utils)');
  return false;
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function run(command: string, args: readonly string[], cwd?: string, input?: Uint8Array): RunResult {
  const result = spawnSync(command, args, { cwd, encoding: 'utf8', maxBuffer: 64 * 1024 * 1024, input });
  if (result.error) throw result.error;
  return { code: result.status ?? -1, stdout: result.stdout, stderr: result.stderr };
}

/** Runs qemu-img; relative data-file names resolve against `cwd`, as qemu does. */
export function qemuImg(args: readonly string[], cwd?: string): RunResult {
  return run('qemu-img', args, cwd);
}

export function qemuIo(args: readonly string[], cwd?: string): RunResult {
  return run('qemu-io', args, cwd);
}

/**
 * Where qemu runs when the caller does not say: the image's directory for an absolute image
 * path. Our images store their data-file name relative to that directory, and qemu 7.2 resolves
 * it against its working directory (test/write/data-file-name.test.ts), as the README says.
 */
function imageCwd(image: string, cwd: string | undefined): string | undefined {
  return cwd ?? (isAbsolute(image) ? dirname(image) : undefined);
}

/** Asserts-friendly summary of `qemu-img check`: exit code and output. */
export function qemuCheck(image: string, cwd?: string): RunResult {
  return qemuImg(['check', image], imageCwd(image, cwd));
}

/** `qemu-img compare` of a raw file against an image (0 identical, 1 differ, 2 error). */
export function qemuCompare(raw: string, image: string, cwd?: string, imageFormat = 'qcow2'): RunResult {
  return qemuImg(['compare', '-f', 'raw', '-F', imageFormat, raw, image], imageCwd(image, cwd));
}

export function qemuInfo(image: string, cwd?: string): Record<string, unknown> {
  const result = qemuImg(['info', '--output=json', image], cwd);
  if (result.code !== 0) throw new Error(`qemu-img info failed: ${result.stderr}`);
  return JSON.parse(result.stdout) as Record<string, unknown>;
}

/** A fresh temporary directory removed after the test. */
export function tempDir(t: TestContext, prefix = 'qcow2-stream-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}
