#!/usr/bin/env node
/**
 * The `qcow2-stream` command. Each command lives in its own file and registers itself here.
 * Exit codes: 0 ok, 1 differences or findings (compare, check), 2 error, 130/143 interrupted.
 */

import { existsSync, readFileSync } from 'node:fs';
import { Command, CommanderError } from 'commander';
import { ExitCode, writeStdout } from './common.js';
import { registerConvert } from './convert.js';
import { registerWrap } from './wrap.js';
import { registerExport } from './export.js';
import { registerInfo } from './info.js';
import { registerMap } from './map.js';
import { registerCheck } from './check.js';
import { registerCompare } from './compare.js';

/** The package version, from package.json two levels up (src/cli) or three (dist/src/cli). */
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

export function buildProgram(): Command {
  const program = new Command('qcow2-stream')
    .description('Convert disk images between raw and qcow2 with an external data file, as streams')
    .version(version, '-V, --version')
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride()
    .configureOutput({
      writeOut: writeStdout,
      outputError: (text, write) => write(`qcow2-stream: ${text.replace(/^error: /, '')}`),
    });
  for (const register of [registerConvert, registerWrap, registerExport, registerInfo, registerMap, registerCheck, registerCompare]) {
    register(program);
  }
  for (const command of program.commands) command.exitOverride();
  return program;
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

await main();
