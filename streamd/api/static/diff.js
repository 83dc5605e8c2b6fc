// A line diff (longest common subsequence) between two prompt versions, for people: "  " same, "- " old, "+ " new.

export function lineDiff(a, b) {
  const x = a.split("\n"), y = b.split("\n");
  const n = x.length, m = y.length;
  const L = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
    }
  }
  const out = [];
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (x[i] === y[j]) { out.push(["same", x[i]]); i++; j++; }
    else if (L[i + 1][j] >= L[i][j + 1]) { out.push(["del", x[i]]); i++; }
    else { out.push(["add", y[j]]); j++; }
  }
  while (i < n) out.push(["del", x[i++]]);
  while (j < m) out.push(["add", y[j++]]);
  return out;
}

// a prompt record's content as text lines: its text (and schema), or its phrases one per line
export function promptContent(rec) {
  if (!rec) return "";
  if (rec.deleted) return "(deleted)";
  if (Array.isArray(rec.phrases)) return rec.phrases.join("\n");
  const schema = rec.schema ? "\n--- schema ---\n" + JSON.stringify(rec.schema, null, 2) : "";
  return (rec.text || "") + schema;
}
