/**
 * The npm package as a user gets it: `npm pack` of this built checkout. Its file list holds no
 * dead file and every README link resolves inside it (test/package/package-files.ts). Installed
 * into two fresh projects, ESM + TypeScript and CommonJS, a program written from the README
 * (consumer/program.ts: the main entry and both subpaths, a switch on every error code) is
 * type-checked with this repository's TypeScript (strict; nodenext, and node10 through the
 * `types`/`typesVersions` fallback) and run; qemu-img checks the image it converts.
 *
 * The install uses npm's cache (`--prefer-offline`; CI's `npm ci` fills it) and skips with a
 * message only when it fails for want of the network.
 */

import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { hasQemuImg, qemuCheck, qemuCompare, tempDir } from '../helpers/qemu.js';
import { readmeLinkProblems, reachability, type PackageJson, type PackedFiles } from './package-files.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as PackageJson & { name: string; version: string };
// Packing with --ignore-scripts takes dist/ as built: without a build there is nothing to test.
const skip = existsSync(join(root, 'dist/src/index.js')) && existsSync(join(root, 'dist/src/cli/cli-bundle.cjs')) ? undefined : 'not built: run npm run build';

/** The environment for child npm runs: none of the npm_* variables of the `npm test` running us. */
function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return { ...Object.fromEntries(Object.entries(process.env).filter(([name]) => !/^npm_/i.test(name))), ...extra };
}

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to its end without blocking the event loop (the tsc runs go side by side). */
function run(command: string, args: readonly string[], cwd: string, env = cleanEnv()): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** The repository's top-level names: a code span starting with one names a place of the repository. */
function repositoryTopLevel(): Set<string> {
  const tracked = spawnSync('git', ['ls-files'], { cwd: root, encoding: 'utf8' });
  const names = tracked.status === 0 ? tracked.stdout.split('\n').filter(Boolean) : readdirSync(root);
  return new Set(names.map((name) => name.split('/')[0]!));
}

const NETWORK_FAILURE = /\b(?:ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|ENOTCACHED)\b/;

/** npm install of the tarball (and `extra` packages) into `dir`; false when it skipped `t` for want of the network. */
async function install(t: TestContext, dir: string, specs: readonly string[], env?: Record<string, string>): Promise<boolean> {
  const result = await run('npm', ['install', '--prefer-offline', '--no-audit', '--no-fund', ...specs], dir, cleanEnv(env));
  if (result.code !== 0 && NETWORK_FAILURE.test(result.stderr)) {
    t.skip(`cannot install the tarball's dependencies without the network (npm's cache lacks them): ${result.stderr.match(NETWORK_FAILURE)![0]}`);
    return false;
  }
  assert.equal(result.code, 0, `npm install failed:\n${result.stderr}`);
  return true;
}

/** The version of a devDependency as installed here, so the consumer's copy comes from npm's cache. */
function installedVersion(name: string): string {
  return (JSON.parse(readFileSync(join(root, 'node_modules', name, 'package.json'), 'utf8')) as { version: string }).version;
}

function writeJson(path: string, value: unknown): void {
  writeFileSync(path, `${JSON.stringify(value, null, 2)}\n`);
}

const STRICT = { strict: true, target: 'ES2022', types: ['node'], outDir: 'out' };

/** What consumer/program.ts prints when everything works. */
const EXPECTED_REPORT = {
  sameBytes: true,
  sameHashes: true,
  clean: true,
  job: 'convert',
  failures: ['QCOW_ERR_FILE missing.qcow2 (ENOENT, errno -2)', 'QCOW_ERR_BAD_MAGIC (not an image we can read)', 'QCOW_ERR_JOB (a job payload the fleet refuses)'],
};

/** Runs the compiled program in a fresh directory; checks its report and, with qemu-img, its image. */
async function runProgram(t: TestContext, program: string): Promise<void> {
  const dir = tempDir(t, 'qcow2-stream-consumer-run-');
  const result = await run(process.execPath, [program], dir);
  assert.equal(result.code, 0, result.stderr);
  assert.deepEqual(JSON.parse(result.stdout), EXPECTED_REPORT);
  if (hasQemuImg) {
    assert.equal(qemuCheck('disk.qcow2', dir).code, 0, 'qemu-img check');
    assert.equal(qemuCompare('disk.raw', 'disk.qcow2', dir).code, 0, 'qemu-img compare');
  }
}

describe('the packed tarball', { skip }, () => {
  let packDir = '';
  let tarball = '';
  let packed: PackedFiles = { paths: new Set(), read: () => '' };

  before(() => {
    packDir = mkdtempSync(join(tmpdir(), 'qcow2-stream-pack-'));
    // No prepare script: pack what `npm run build` made.
    const result = spawnSync('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', packDir], { cwd: root, env: cleanEnv(), encoding: 'utf8' });
    assert.equal(result.status, 0, result.stderr);
    const [info] = JSON.parse(result.stdout) as [{ filename: string; files: { path: string }[] }];
    tarball = join(packDir, info.filename);
    packed = { paths: new Set(info.files.map((file) => file.path)), read: (path) => readFileSync(join(root, path), 'utf8') };
  });
  after(() => {
    if (packDir) rmSync(packDir, { recursive: true, force: true });
  });

  test('every file in it is used: no dead files, no tests', () => {
    const { unreached, missingEntries } = reachability(pkg, packed);
    assert.deepEqual(missingEntries, [], 'package.json names files the tarball lacks');
    assert.deepEqual(unreached, [], 'files nothing in the package uses: drop them from package.json "files"');
    assert.deepEqual([...packed.paths].filter((path) => /(?:^|\/)test\/|\.test\.[cm]?[jt]s$/.test(path)), []);
    // The CLI ships as its bundle; fleet still imports the CLI's command definitions (and so commander).
    const cli = [...packed.paths].filter((path) => path.startsWith('dist/src/cli/') && /\.[cm]?js$/.test(path)).sort();
    assert.deepEqual(cli, ['dist/src/cli/cli-bundle.cjs', 'dist/src/cli/common.js', 'dist/src/cli/convert.js', 'dist/src/cli/export.js', 'dist/src/cli/progress.js', 'dist/src/cli/qcow2-stream.cjs']);
  });

  test('every README link resolves inside it or is an absolute URL', () => {
    assert.deepEqual(readmeLinkProblems(packed, repositoryTopLevel()), []);
  });

  test('an ESM + TypeScript project installs it, type-checks (nodenext and node10) and runs the program', async (t) => {
    const dir = tempDir(t, 'qcow2-stream-esm-');
    writeJson(join(dir, 'package.json'), { name: 'esm-consumer', private: true, type: 'module' });
    // bullmq and ioredis: the fleet's peers, whose types qcow2-stream/fleet's declarations name.
    if (!(await install(t, dir, [tarball, `@types/node@${installedVersion('@types/node')}`, `bullmq@${installedVersion('bullmq')}`, `ioredis@${installedVersion('ioredis')}`]))) return;
    copyFileSync(join(root, 'test/package/consumer/program.ts'), join(dir, 'program.ts'));
    // skipLibCheck off: the package's own declarations are checked under the consumer's settings too.
    writeJson(join(dir, 'tsconfig.json'), { compilerOptions: { ...STRICT, module: 'nodenext', moduleResolution: 'nodenext', skipLibCheck: false }, files: ['program.ts'] });
    writeJson(join(dir, 'tsconfig.node10.json'), { extends: './tsconfig.json', compilerOptions: { module: 'es2022', moduleResolution: 'node10', noEmit: true } });
    const [nodenext, node10] = await Promise.all([run(process.execPath, [tsc, '-p', 'tsconfig.json'], dir), run(process.execPath, [tsc, '-p', 'tsconfig.node10.json'], dir)]);
    assert.equal(nodenext.code, 0, `tsc (nodenext):\n${nodenext.stdout}${nodenext.stderr}`);
    assert.equal(node10.code, 0, `tsc (node10):\n${node10.stdout}${node10.stderr}`);
    await runProgram(t, join(dir, 'out/program.js'));
  });

  test('a CommonJS project installs it and runs the program through require()', async (t) => {
    const dir = tempDir(t, 'qcow2-stream-cjs-');
    writeJson(join(dir, 'package.json'), { name: 'cjs-consumer', private: true, type: 'commonjs' });
    // Without the native addon: this project runs the pure-JS paths (and installs faster).
    if (!(await install(t, dir, [tarball, `@types/node@${installedVersion('@types/node')}`], { QCOW2_STREAM_NO_NATIVE: '1' }))) return;
    assert.ok(!existsSync(join(dir, 'node_modules/qcow2-stream/src/native/build')), 'QCOW2_STREAM_NO_NATIVE=1 still built the addon');
    copyFileSync(join(root, 'test/package/consumer/program.ts'), join(dir, 'program.ts'));
    writeJson(join(dir, 'tsconfig.json'), { compilerOptions: { ...STRICT, module: 'nodenext', moduleResolution: 'nodenext', skipLibCheck: true }, files: ['program.ts'] });
    const compiled = await run(process.execPath, [tsc, '-p', 'tsconfig.json'], dir);
    assert.equal(compiled.code, 0, `tsc (CommonJS):\n${compiled.stdout}${compiled.stderr}`);
    const program = join(dir, 'out/program.js');
    assert.match(readFileSync(program, 'utf8'), /require\("qcow2-stream\/fleet"\)/, 'not compiled to CommonJS');
    await runProgram(t, program);
  });
});

// The checks above pass on this package; these show that they catch what they guard against.
describe('the tarball checks', () => {
  const files = (contents: Record<string, string>): PackedFiles => ({
    paths: new Set(Object.keys(contents)),
    read: (path) => contents[path] ?? '',
  });
  const pkgJson: PackageJson = { exports: { '.': { types: './dist/index.d.ts', default: './dist/index.js' } }, bin: { tool: 'dist/cli/launch.cjs' } };
  const good = {
    'package.json': '{}',
    'README.md': '# Tool\n\n## Use\n\nSee [Use](#use), [the guide](GUIDE.md#setup), `examples/` and [a site](https://example.org/).\n',
    LICENSE: 'MIT',
    'GUIDE.md': '# Guide\n\n### Setup\n',
    'examples/one.ts': "import { run } from '../dist/index.js';\n",
    'dist/index.js': "export * from './util.js';\n//# sourceMappingURL=index.js.map",
    'dist/index.js.map': '{"version":3,"sources":["../src/index.ts"],"mappings":""}',
    'src/index.ts': '',
    'dist/index.d.ts': "export * from './util.js';",
    'dist/util.js': '',
    'dist/util.d.ts': '',
    'dist/cli/launch.cjs': "require(join(__dirname, 'bundle.cjs'));",
    'dist/cli/bundle.cjs': '',
  };

  test('a package whose every file is used passes', () => {
    assert.deepEqual(reachability(pkgJson, files(good)).unreached, []);
    assert.deepEqual(readmeLinkProblems(files(good), new Set(['examples', 'src', 'bench'])), []);
  });

  test('a file nothing uses is dead', () => {
    const { unreached } = reachability(pkgJson, files({ ...good, 'dist/cli/main.js': "import './bundle.cjs';", 'test/a.test.js': '' }));
    assert.deepEqual(unreached, ['dist/cli/main.js', 'test/a.test.js']);
  });

  test('a README link or repository path missing from the tarball, or a wrong anchor, is reported', () => {
    const readme = '# Tool\n\nSee [the API](docs/api/index.html), [setup](GUIDE.md#install), [up](#nowhere), `bench/api.mjs` and `qcow2-stream/fleet`.\n';
    assert.deepEqual(readmeLinkProblems(files({ ...good, 'README.md': readme }), new Set(['bench', 'examples'])), [
      'link (docs/api/index.html): not in the tarball',
      'link (GUIDE.md#install): no heading #install in GUIDE.md',
      'link (#nowhere): no heading #nowhere in README.md',
      '`bench/api.mjs`: not in the tarball',
    ]);
  });
});
