/**
 * Numbered objects with a hard limit: numbers 1..limit, 0 never valid.
 * Allocation reuses the lowest free number after a rotating cursor, so a
 * just-freed number is not handed out again at once.
 */
export class HandleTable<T> {
  private readonly items: (T | undefined)[];
  private cursor = 0;
  private count = 0;

  constructor(readonly limit: number) {
    this.items = new Array<T | undefined>(limit + 1);
  }

  get size(): number {
    return this.count;
  }

  get full(): boolean {
    return this.count >= this.limit;
  }

  get(handle: number): T | undefined {
    if (!Number.isInteger(handle) || handle < 1 || handle > this.limit) return undefined;
    return this.items[handle];
  }

  /** Stores `make(handle)` under a free number; null when the table is full. */
  add(make: (handle: number) => T): T | null {
    if (this.full) return null;
    for (let i = 0; i < this.limit; i++) {
      const h = ((this.cursor + i) % this.limit) + 1;
      if (this.items[h] === undefined) {
        const item = make(h);
        this.items[h] = item;
        this.count++;
        this.cursor = h % this.limit;
        return item;
      }
    }
    return null;
  }

  /** Stores `item` under a given number (state restore); false when taken or out of range. */
  put(handle: number, item: T): boolean {
    if (!Number.isInteger(handle) || handle < 1 || handle > this.limit || this.items[handle] !== undefined) return false;
    this.items[handle] = item;
    this.count++;
    return true;
  }

  delete(handle: number): boolean {
    if (this.get(handle) === undefined) return false;
    this.items[handle] = undefined;
    this.count--;
    return true;
  }

  *values(): IterableIterator<T> {
    for (const item of this.items) if (item !== undefined) yield item;
  }

  clear(): void {
    this.items.fill(undefined);
    this.count = 0;
    this.cursor = 0;
  }
}
