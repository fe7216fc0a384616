/**
 * What a packed tarball's file list must satisfy, as pure functions over the list and the
 * files' text (test/package/tarball.test.ts gives them `npm pack`'s list):
 * - every file is reached from something that uses it: package.json's entry points (`exports`,
 *   `main`, `types`, `typesVersions`, `bin`, the install script), the README, and from there
 *   the relative imports and file names in code, `sourceMappingURL`s, source maps' `sources`,
 *   Markdown links and binding.gyp's `sources`; a module's .js and .d.ts count as one. A file
 *   nothing reaches is dead weight;
 * - every link of the README resolves inside the tarball (anchors included) or is an absolute
 *   URL, and so does every path the README names in a code span, when it names a place of the
 *   repository (its first segment is one of `topLevel`).
 */

import { posix } from 'node:path';

/** The fields of package.json that say what the package uses. */
export interface PackageJson {
  main?: string;
  types?: string;
  bin?: string | Record<string, string>;
  exports?: unknown;
  typesVersions?: Record<string, Record<string, string[]>>;
  scripts?: Record<string, string>;
}

/** The tarball's files (paths relative to the package root, '/'-separated) and their text. */
export interface PackedFiles {
  paths: ReadonlySet<string>;
  read(path: string): string;
}

const ABSOLUTE_URL = /^[a-z][a-z0-9+.-]*:/i;
const JS_LIKE = /\.(?:c|m)?(?:j|t)s$/;

function normalize(path: string): string {
  return posix.normalize(path.replace(/^\.\//, ''));
}

/** `target` relative to the directory of `from`, or undefined when it leaves the package. */
function resolveFrom(from: string, target: string): string | undefined {
  const path = posix.normalize(posix.join(posix.dirname(from), target));
  return path.startsWith('../') || path === '..' ? undefined : path;
}

function leaves(value: unknown): string[] {
  if (typeof value === 'string') return [value];
  if (Array.isArray(value)) return value.flatMap(leaves);
  if (typeof value === 'object' && value !== null) return Object.values(value).flatMap(leaves);
  return [];
}

/** The files package.json itself makes npm, Node or TypeScript open. */
export function entryPoints(pkg: PackageJson, paths: ReadonlySet<string>): string[] {
  const entries = ['package.json', 'README.md', 'LICENSE'];
  if (pkg.main) entries.push(pkg.main);
  if (pkg.types) entries.push(pkg.types);
  entries.push(...leaves(pkg.bin), ...leaves(pkg.exports), ...leaves(pkg.typesVersions));
  const install = pkg.scripts?.install?.match(/(?:^|\s)node\s+(\S+)/)?.[1];
  if (install) {
    entries.push(install);
    // node-gyp reads binding.gyp from the directory the install script builds in.
    const gyp = posix.join(posix.dirname(normalize(install)), 'binding.gyp');
    if (paths.has(gyp)) entries.push(gyp);
  }
  return entries.map(normalize);
}

/** Files (or directories, as a trailing '/') that `path`'s content points at, unresolved. */
function references(path: string, text: string, paths: ReadonlySet<string>): string[] {
  const found: string[] = [];
  const add = (target: string | undefined) => {
    if (target !== undefined) found.push(target);
  };
  for (const m of text.matchAll(/[#@] sourceMappingURL=(\S+?)(?:\s|\*\/|$)/g)) add(resolveFrom(path, m[1]!));
  if (path.endsWith('.map')) {
    const map = JSON.parse(text) as { sourceRoot?: string; sources?: string[] };
    for (const source of map.sources ?? []) add(resolveFrom(path, posix.join(map.sourceRoot ?? '', source)));
  } else if (path.endsWith('.gyp')) {
    const gyp = JSON.parse(text) as { targets?: { sources?: string[] }[] };
    for (const target of gyp.targets ?? []) for (const source of target.sources ?? []) add(resolveFrom(path, source));
  } else if (path.endsWith('.md')) {
    for (const link of markdownLinks(text)) if (!ABSOLUTE_URL.test(link) && !link.startsWith('#')) add(resolveFrom(path, link.split('#')[0]!));
    for (const span of codeSpanPaths(text)) add(resolveFrom(path, span));
  } else if (JS_LIKE.test(path)) {
    // Every quoted relative name: imports, require(), new URL(…, import.meta.url), join(__dirname, …).
    for (const m of text.matchAll(/(['"`])((?:\.\.?\/)?[\w@.\/-]+\.[\w]+)\1/g)) {
      const target = resolveFrom(path, m[2]!);
      if (target === undefined) continue;
      // A .js specifier names the .d.ts beside a .d.ts file and the .ts source beside a .ts file.
      const preferred = path.endsWith('.d.ts') ? target.replace(/\.js$/, '.d.ts') : path.endsWith('.ts') ? target.replace(/\.js$/, '.ts') : target;
      add([preferred, target].find((candidate) => paths.has(candidate)));
    }
  }
  return found;
}

/** The shipped files reached from the entry points, and those that nothing reaches. */
export function reachability(pkg: PackageJson, files: PackedFiles): { reached: Set<string>; unreached: string[]; missingEntries: string[] } {
  const reached = new Set<string>();
  const missingEntries: string[] = [];
  const queue: string[] = [];
  const visit = (target: string) => {
    const matches = target.endsWith('/') || !files.paths.has(target) ? [...files.paths].filter((p) => p.startsWith(target.replace(/\/?$/, '/'))) : [target];
    for (const match of matches) {
      if (reached.has(match)) continue;
      reached.add(match);
      queue.push(match);
    }
  };
  for (const entry of entryPoints(pkg, files.paths)) {
    if (files.paths.has(entry)) visit(entry);
    else missingEntries.push(entry);
  }
  while (queue.length > 0) {
    const path = queue.shift()!;
    for (const target of references(path, files.read(path), files.paths)) visit(target);
    // tsc emits a module as x.js and x.d.ts: they ship as a pair, whichever of them is reached.
    const companion = path.endsWith('.d.ts') ? path.replace(/\.d\.ts$/, '.js') : path.endsWith('.js') ? path.replace(/\.js$/, '.d.ts') : undefined;
    if (companion !== undefined && files.paths.has(companion)) visit(companion);
  }
  return { reached, unreached: [...files.paths].filter((p) => !reached.has(p)).sort(), missingEntries };
}

/** The text outside fenced code blocks. */
function prose(markdown: string): string {
  return markdown.replace(/^```[^\n]*\n[\s\S]*?^```[^\n]*$/gm, '');
}

/** The targets of the Markdown links and images, in order. */
export function markdownLinks(markdown: string): string[] {
  return [...prose(markdown).matchAll(/\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)/g)].map((m) => m[1]!);
}

/** Code spans that look like relative paths: `dir/file.ext`, `dir/`, `FILE.md`. */
export function codeSpanPaths(markdown: string): string[] {
  return [...prose(markdown).matchAll(/`([^`\n]+)`/g)]
    .map((m) => m[1]!)
    .filter((span) => /^(?:\.\/)?[\w.-]+(?:\/[\w.-]*)+$/.test(span) || /^[\w.-]+\.md$/.test(span))
    .map(normalize);
}

/** GitHub's anchors for the headings of a Markdown file. */
export function headingAnchors(markdown: string): Set<string> {
  const anchors = new Set<string>();
  const seen = new Map<string, number>();
  for (const m of prose(markdown).matchAll(/^#{1,6}\s+(.+?)\s*#*\s*$/gm)) {
    const slug = m[1]!
      .toLowerCase()
      .replace(/[^\p{L}\p{N}\s_-]/gu, '')
      .replace(/\s/g, '-');
    const n = seen.get(slug) ?? 0;
    seen.set(slug, n + 1);
    anchors.add(n === 0 ? slug : `${slug}-${n}`);
  }
  return anchors;
}

/**
 * What is wrong with the README's links inside the tarball: a relative link to a file or anchor
 * the tarball lacks, or a code span naming a place of the repository (`topLevel`: its top-level
 * names) that the tarball lacks.
 */
export function readmeLinkProblems(files: PackedFiles, topLevel: ReadonlySet<string>, readme = 'README.md'): string[] {
  const text = files.read(readme);
  const problems: string[] = [];
  const isDirectory = (path: string) => [...files.paths].some((p) => p.startsWith(`${path.replace(/\/$/, '')}/`));
  for (const link of markdownLinks(text)) {
    if (ABSOLUTE_URL.test(link)) continue;
    const [file = '', anchor] = link.split('#') as [string, string | undefined];
    const target = file === '' ? readme : resolveFrom(readme, file);
    if (target === undefined || !(files.paths.has(target) || isDirectory(target))) {
      problems.push(`link (${link}): not in the tarball`);
    } else if (anchor !== undefined && target.endsWith('.md') && !headingAnchors(files.read(target)).has(anchor)) {
      problems.push(`link (${link}): no heading #${anchor} in ${target}`);
    }
  }
  for (const span of codeSpanPaths(text)) {
    if (!topLevel.has(span.split('/')[0]!)) continue;
    if (!(files.paths.has(span) || isDirectory(span))) problems.push(`\`${span}\`: not in the tarball`);
  }
  return problems;
}
