//! Aligned plain-text tables, the CLI's default output.

/// Columns are separated by this many spaces, as kubectl does.
const GAP: usize = 3;

/// A table built row by row, rendered with every column as wide as its widest cell.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&'static str]) -> Self {
        Self { headers: headers.to_vec(), rows: Vec::new() }
    }

    /// Adds a row; missing cells render empty and extra ones are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, without trailing spaces.
    pub fn render(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| (0..self.headers.len()).map(|i| clean(r.get(i).map_or("", |c| c))).collect())
            .collect();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let headers = self.headers.iter().map(|h| h.to_string()).collect::<Vec<_>>();
        let mut out = String::new();
        for row in std::iter::once(&headers).chain(&rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str(&" ".repeat(GAP));
                }
                line.push_str(cell);
                line.push_str(&" ".repeat(w - cell.chars().count()));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Control characters would break the alignment or drive the terminal; show them as `?`.
fn clean(cell: &str) -> String {
    cell.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_without_trailing_space() {
        let mut t = Table::new(&["NAME", "IP", "MODE"]);
        t.row(vec!["client".into(), "10.0.0.5".into(), "strict".into()]);
        t.row(vec!["a".into(), "fd00::1234:5".into()]);
        assert_eq!(
            t.render(),
            "NAME     IP             MODE\nclient   10.0.0.5       strict\na        fd00::1234:5\n"
        );
    }

    #[test]
    fn counts_characters_not_bytes_and_neuters_control_characters() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["é✓".into(), "x".into()]);
        t.row(vec!["\u{1b}[31m".into(), "y".into()]);
        assert_eq!(t.render(), "A       B\né✓      x\n?[31m   y\n");
    }
}
