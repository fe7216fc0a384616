/**
 * A small least-recently-used cache keyed by number (host offsets of L2 tables). A `Map` keeps
 * insertion order, so re-inserting on a hit and evicting the first key is an O(1) LRU.
 */
export class LruCache<V> {
  private readonly entries = new Map<number, V>();

  /**
   * @param capacity the most entries kept; at least 1.
   * @param onEvict called with each value pushed out by `set` (not by `clear`), e.g. to reuse its buffer.
   */
  constructor(
    readonly capacity: number,
    private readonly onEvict?: (value: V) => void,
  ) {
    if (!(capacity >= 1)) throw new RangeError(`LRU capacity must be at least 1, got ${capacity}`);
  }

  get size(): number {
    return this.entries.size;
  }

  get(key: number): V | undefined {
    const value = this.entries.get(key);
    if (value !== undefined) {
      this.entries.delete(key);
      this.entries.set(key, value);
    }
    return value;
  }

  set(key: number, value: V): void {
    this.entries.delete(key);
    this.entries.set(key, value);
    while (this.entries.size > this.capacity) {
      const oldest = this.entries.entries().next();
      if (oldest.done) break;
      this.entries.delete(oldest.value[0]);
      this.onEvict?.(oldest.value[1]);
    }
  }

  clear(): void {
    this.entries.clear();
  }
}
