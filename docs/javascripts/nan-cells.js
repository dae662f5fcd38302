// Mark the table cells that hold a NaN, so the frameworks' failures stand out in the
// generated comparison tables (styled in stylesheets/extra.css).
// Only the edge-value tables (first header "edge ..."); rows whose input holds a NaN
// are left alone: NaN is the right answer there.
function markNanCells() {
  const nan = /\bnan\b/;
  document.querySelectorAll(".md-typeset table").forEach((table) => {
    const first = table.querySelector("th");
    if (first && first.textContent.trim().startsWith("edge")) {
      markRows(table, nan);
    }
  });
}

function markRows(table, nan) {
  table.querySelectorAll("tr").forEach((row) => {
    const cells = row.querySelectorAll("td");
    if (cells.length === 0 || nan.test(cells[0].textContent)) {
      return;
    }
    cells.forEach((cell) => {
      if (nan.test(cell.textContent)) {
        cell.classList.add("sm-nan");
      }
    });
  });
}

if (typeof document$ !== "undefined") {
  document$.subscribe(markNanCells);
} else {
  document.addEventListener("DOMContentLoaded", markNanCells);
}
