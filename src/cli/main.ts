#!/usr/bin/env node
/**
 * The `qcow2-stream` command. Each command lives in its own file and registers itself here.
 * Exit codes: 0 ok, 1 differences or findings (compare, check), 2 error, 130/143 interrupted.
 */

import { existsSync, readFileSync } from 'node:fs';
import { Command, CommanderError, type OutputConfiguration } from 'commander';
import { InvalidArgumentError } from '../errors.js';
import { ExitCode, writeStdout } from './common.js';
import { registerConvert } from './convert.js';
import { registerWrap } from './wrap.js';
import { registerExport } from './export.js';
import { registerInfo } from './info.js';
import { registerMap } from './map.js';
import { registerCheck } from './check.js';
import { registerCompare } from './compare.js';
import { registerMeasure } from './measure.js';
import { registerFleet } from './fleet.js';

/** The package version, from package.json two levels up (src/cli) or three (dist/src/cli, the bundle too). */
function packageVersion(): string {
  for (const up of ['../../package.json', '../../../package.json']) {
    const url = new URL(up, import.meta.url);
    if (!existsSync(url)) continue;
    const pkg = JSON.parse(readFileSync(url, 'utf8')) as { name?: string; version?: string };
    if (pkg.name === 'qcow2-stream' && pkg.version) return pkg.version;
  }
  return 'unknown';
}
const version = packageVersion();

/**
 * Builds the `qcow2-stream` program with every command registered. Usage errors (unknown
 * command or option, a bad option value) print one line with the error code and a hint, like
 * every other error, and end in a CommanderError that main() turns into exit code 2.
 */
export function buildProgram(): Command {
  const program = new Command('qcow2-stream')
    .description('Convert disk images between raw and qcow2 with an external data file, as streams')
    .version(version, '-V, --version')
    .exitOverride()
    .configureOutput(usageOutput('qcow2-stream'))
    .addHelpText(
      'after',
      `
Exit codes: 0 success, 1 differences (compare) or problems found (check), 2 error.
Sizes take binary suffixes: 512, 64K, 20G, 1.5T, 4KiB.

Examples:
  qcow2-stream convert disk.raw disk.qcow2       # metadata + disk.data
  qcow2-stream export disk.qcow2 disk.raw
  qcow2-stream compare disk.raw disk.qcow2
  qcow2-stream worker --connection redis://127.0.0.1:6379   # run jobs from a queue
  qcow2-stream convert --help                    # every option of a command`,
    );
  for (const register of [registerConvert, registerWrap, registerExport, registerInfo, registerMap, registerCheck, registerCompare, registerMeasure, registerFleet]) {
    register(program);
  }
  for (const command of program.commands) command.exitOverride().configureOutput(usageOutput(`qcow2-stream ${command.name()}`));
  return program;
}

/** Where help goes (stdout) and how a usage error of `commandPath` is printed. */
function usageOutput(commandPath: string): OutputConfiguration {
  return {
    writeOut: writeStdout,
    outputError: (text, write) => {
      const message = text.trim().replace(/^error: /, '');
      write(`qcow2-stream: ${message} [${InvalidArgumentError.CODE}]\n  hint: run '${commandPath} --help' for usage\n`);
    },
  };
}

async function main(): Promise<void> {
  try {
    await buildProgram().parseAsync(process.argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      // --help and --version end with code 0; usage errors are errors.
      process.exitCode = err.exitCode === 0 ? ExitCode.OK : ExitCode.ERROR;
      return;
    }
    throw err;
  }
}

// Not a top-level await: the installed command is a CommonJS bundle (src/cli/bundle.mjs).
void main();
