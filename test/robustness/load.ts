/** Runs load-child.ts on a spec and returns its memory report. */

import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { LoadReport, LoadSpec } from './load-child.js';

const CHILD = fileURLToPath(new URL('./load-child.ts', import.meta.url));

export type { LoadReport, LoadSpec };

/** Asynchronous, so the test runner stays responsive (and its timeout works) while it runs. */
export async function runLoad(dir: string, spec: LoadSpec, env: Record<string, string> = {}): Promise<LoadReport> {
  const specPath = join(dir, 'load.spec.json');
  writeFileSync(specPath, JSON.stringify(spec));
  const child = spawn(process.execPath, ['--import', import.meta.resolve('tsx'), CHILD, specPath], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (text: string) => (stdout += text));
  child.stderr.setEncoding('utf8').on('data', (text: string) => (stderr += text));
  const [code] = (await once(child, 'close')) as [number | null];
  if (code !== 0) throw new Error(`the load process exited with ${code}: ${stderr}`);
  return JSON.parse(stdout) as LoadReport;
}
