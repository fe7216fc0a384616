/**
 * Path questions the writers ask before touching anything: the default data-file name, and
 * whether two names (existing or not) denote the same file.
 */

import { realpath, stat } from 'node:fs/promises';
import type { Stats } from 'node:fs';
import { basename, dirname, format, parse, resolve } from 'node:path';

/** `disk.qcow2` → `disk.data`, `img/disk` → `img/disk.data` (directory kept as given). */
export function defaultDataFilePath(output: string): string {
  const parsed = parse(output);
  return format({ dir: parsed.dir, name: parsed.name, ext: '.data' });
}

/** stat() that returns undefined for a missing file; other errors too (the later open reports them). */
export async function statIfExists(path: string): Promise<Stats | undefined> {
  try {
    return await stat(path);
  } catch {
    return undefined;
  }
}

/** The absolute path with symlinks in the existing part resolved (the file itself may not exist). */
async function canonicalPath(path: string): Promise<string> {
  const absolute = resolve(path);
  try {
    return await realpath(absolute);
  } catch {
    try {
      return resolve(await realpath(dirname(absolute)), basename(absolute));
    } catch {
      return absolute;
    }
  }
}

/** A file known by its identity (when it exists) and its canonical path. */
export interface FileIdentity {
  stats: Stats | undefined;
  path: string;
}

export async function identify(path: string, knownStats?: Stats): Promise<FileIdentity> {
  return { stats: knownStats ?? (await statIfExists(path)), path: await canonicalPath(path) };
}

/** True when both denote the same file: same device and inode, or the same canonical path. */
export function sameFile(a: FileIdentity, b: FileIdentity): boolean {
  if (a.stats && b.stats && a.stats.ino !== 0) return a.stats.dev === b.stats.dev && a.stats.ino === b.stats.ino;
  return a.path === b.path;
}
