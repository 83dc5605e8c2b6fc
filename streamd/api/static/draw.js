// A frame and its result record on a canvas: boxes with label, track id and confidence, masks tinted. Drawn from the
// record exactly as consumers get it (outputs.<stage>.detections, and the masks of a segment stage's objects).

export const PALETTE = [[255, 56, 56], [72, 249, 10], [0, 194, 255], [255, 178, 29], [207, 210, 49],
  [146, 204, 23], [61, 219, 134], [26, 147, 52], [0, 212, 187], [44, 153, 168], [52, 69, 147], [100, 115, 255],
  [0, 24, 236], [132, 56, 255], [82, 0, 133], [203, 56, 255], [255, 149, 200], [255, 55, 199]];

export function detections(record) {
  const out = [];
  for (const value of Object.values((record && record.outputs) || {})) {
    if (value && Array.isArray(value.detections)) {
      for (const d of value.detections) if (d && Array.isArray(d.box) && d.box.length === 4) out.push(d);
    }
  }
  return out;
}

// a segment stage's (SAM 2) objects that carry a mask: tinted like a detection's mask; their box is their track's
export function segments(record) {
  const out = [];
  for (const value of Object.values((record && record.outputs) || {})) {
    if (value && Array.isArray(value.objects)) {
      for (const o of value.objects) if (o && o.mask && typeof o.mask === "object") out.push(o);
    }
  }
  return out;
}

export function colour(d) {  // a track's colour (its box, its detection's mask, its segment mask alike)
  const key = d.track_id ?? d.object_id ?? d.class_id ?? 0;
  const i = Number.isInteger(key) ? key : [...String(key)].reduce((a, c) => a + c.charCodeAt(0), 0);
  return PALETTE[Math.abs(i) % PALETTE.length];
}

export function labelText(d) {
  const parts = [String(d.label ?? d.class_id ?? "?")];
  if (d.track_id !== undefined && d.track_id !== null) parts.push(`#${d.track_id}`);
  if (typeof d.confidence === "number") parts.push(d.confidence.toFixed(2));
  return parts.join(" ");
}

// COCO uncompressed RLE (column-major, zeros first) tinted into an ImageData of the frame's size
function tintMask(img, mask, rgb) {
  const [h, w] = mask.size || [];
  if (h !== img.height || w !== img.width || !Array.isArray(mask.counts)) return;
  // counts from a record are data: each an integer 0..h*w, at most h*w+1 of them, summing to h*w (a huge or
  // negative run would loop for minutes or tint outside the mask): anything else is not drawn
  const n = h * w, counts = mask.counts;
  if (counts.length > n + 1 || !counts.every((c) => Number.isInteger(c) && c >= 0 && c <= n)) return;
  if (counts.reduce((a, c) => a + c, 0) !== n) return;
  let pos = 0;
  mask.counts.forEach((run, k) => {
    if (k % 2 === 1) {
      for (let p = pos; p < pos + run; p++) {
        const x = Math.floor(p / h), y = p % h, o = (y * w + x) * 4;
        img.data[o] = (img.data[o] + rgb[0]) >> 1;
        img.data[o + 1] = (img.data[o + 1] + rgb[1]) >> 1;
        img.data[o + 2] = (img.data[o + 2] + rgb[2]) >> 1;
      }
    }
    pos += run;
  });
}

// draws `bitmap` (may be null: keep what is there) and the record's detections; returns how many boxes it drew
export function drawFrame(canvas, bitmap, record) {
  const ctx = canvas.getContext("2d");
  if (bitmap) {
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    ctx.drawImage(bitmap, 0, 0);
  }
  const dets = detections(record);
  const masked = [...dets.filter((d) => d.mask && typeof d.mask === "object"), ...segments(record)];
  if (bitmap && masked.length) {
    const img = ctx.getImageData(0, 0, canvas.width, canvas.height);
    for (const d of masked) tintMask(img, d.mask, colour(d));
    ctx.putImageData(img, 0, 0);
  }
  const lw = Math.max(2, Math.round(Math.min(canvas.width, canvas.height) / 180));
  ctx.lineWidth = lw;
  ctx.font = `${Math.max(11, lw * 5)}px sans-serif`;
  ctx.textBaseline = "top";
  for (const d of dets) {
    const [x1, y1, x2, y2] = d.box;
    const [r, g, b] = colour(d);
    ctx.strokeStyle = `rgb(${r},${g},${b})`;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = labelText(d);
    const tw = ctx.measureText(text).width + 6, th = Math.max(11, lw * 5) + 4;
    const ty = y1 - th >= 0 ? y1 - th : y1;
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(x1 - lw / 2, ty, tw, th);
    ctx.fillStyle = "#000";
    ctx.fillText(text, x1 + 3 - lw / 2, ty + 2);
  }
  canvas.dataset.boxes = String(dets.length);
  return dets.length;
}
