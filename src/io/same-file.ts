/**
 * One rule for every command: no file a run writes may be a file the same run reads (its input,
 * a data file, a backing file, a manifest) or another of its outputs. Identity is device +
 * inode when the file exists (so symlinks and hard links are seen through), else the canonical
 * path (symlinks in the existing part resolved). qemu gets the same protection from its image
 * locks; we check before anything is created.
 */

import { realpath, stat } from 'node:fs/promises';
import type { Stats } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import { InvalidArgumentError } from '../errors.js';

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

/** A file of a run, named by what it is to the run: `input`, `data file`, `backing file`… */
export interface RunFile {
  role: string;
  /** As the user gave it (for messages). */
  path: string;
  /** Already known (e.g. fstat of an open descriptor): used instead of a stat of the path. */
  stats?: Stats;
  /** For an output: what to do instead when it is one of the inputs. */
  hint?: string;
}

/**
 * Throws an InvalidArgumentError when an output of the run is one of its inputs, or when two
 * outputs are the same file. Character devices (/dev/null, a terminal) and pipes are not
 * files that can be destroyed, and are left out.
 */
export async function refuseOverlaps(inputs: readonly RunFile[], outputs: readonly RunFile[]): Promise<void> {
  const known = async (file: RunFile) => ({ file, id: await identify(file.path, file.stats) });
  const ins = await Promise.all(inputs.map(known));
  const outs = (await Promise.all(outputs.map(known))).filter(({ id }) => !id.stats || id.stats.isFile() || id.stats.isBlockDevice());
  for (const [i, out] of outs.entries()) {
    for (const read of ins) {
      if (sameFile(out.id, read.id)) {
        throw new InvalidArgumentError(`The ${out.file.role} '${out.file.path}' is the ${read.file.role} '${read.file.path}'; refusing to overwrite it`, {
          hint: out.file.hint ?? `Name a different file for the ${out.file.role}`,
        });
      }
    }
    for (const other of outs.slice(0, i)) {
      if (sameFile(out.id, other.id)) {
        throw new InvalidArgumentError(`The ${out.file.role} and the ${other.file.role} are the same file '${out.file.path}'`, {
          hint: `Name a different file for the ${out.file.role}`,
        });
      }
    }
  }
}

/** Refuses an empty output name: it would resolve to the current directory's hidden files. */
export function checkOutputName(path: string, role: string): void {
  if (path === '') throw new InvalidArgumentError(`The ${role} name is empty`, { hint: `Name a file for the ${role}` });
}
